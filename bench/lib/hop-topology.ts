import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { run } from '../../src/core/exec.js'

/**
 * Two places for an upstream, as the gateway of node A sees them, made of
 * network namespaces, bridges and veths in this host:
 *
 *   local:   root netns ── bridge L (SUBNET.1.1/24) ── veth ── netns "l" (SUBNET.1.2)
 *            as a VM on the gateway's own node (its tap on the node's bridge);
 *   remote:  root netns ── veth underlay (SUBNET.0.1/30 ↔ .0.2) ── netns "b" (node B, forwards)
 *              ── bridge B (SUBNET.2.1/24) ── veth ── netns "r" (SUBNET.2.2)
 *            as a VM on another node, reached over a routed underlay
 *            (route SUBNET.2.0/24 via node B): one routed hop and one veth more.
 *
 * Every name starts with `uighop` and a random tag, so that two runs do not
 * meet; destroy() removes them all.
 */
export class HopTopology {
  readonly tag: string
  readonly localNetns: string
  readonly nodeBNetns: string
  readonly remoteNetns: string
  readonly localHost: string
  readonly remoteHost: string
  readonly #prefix: string
  readonly #localBridge: string
  #destroyed = false

  private constructor (tag: string, prefix: string) {
    this.tag = tag
    this.#prefix = prefix
    const base = `uighop${tag}`
    this.localNetns = `${base}-l`
    this.nodeBNetns = `${base}-b`
    this.remoteNetns = `${base}-r`
    this.#localBridge = `${base}bl`
    this.localHost = `${prefix}.1.2`
    this.remoteHost = `${prefix}.2.2`
  }

  /**
   * Makes both paths in `prefix`.0.0/16 (default 10.212), which no route of
   * the host may already cover. Half-made parts are removed when a step fails.
   */
  static async create (prefix = '10.212'): Promise<HopTopology> {
    if (!/^\d{1,3}\.\d{1,3}$/.test(prefix)) throw new RangeError(`prefix takes two octets ("10.212"), not "${prefix}"`)
    const routes = (await run('ip', ['-4', 'route', 'show'])).stdout
    const clash = routes.split('\n').find((l) => l.startsWith(`${prefix}.`))
    if (clash !== undefined) throw new Error(`${prefix}.0.0/16 is in use on this host (${clash.trim()}); pick another prefix`)
    const t = new HopTopology(randomBytes(2).toString('hex'), prefix)
    try {
      await t.#make()
      return t
    } catch (err) {
      t.destroy()
      throw err
    }
  }

  async #make (): Promise<void> {
    const p = this.#prefix
    const base = `uighop${this.tag}`
    const [l, b, r] = [this.localNetns, this.nodeBNetns, this.remoteNetns]
    const ip = async (...args: string[]): Promise<void> => { await run('ip', args) }
    for (const ns of [l, b, r]) {
      await ip('netns', 'add', ns)
      await ip('-n', ns, 'link', 'set', 'lo', 'up')
    }
    // local: a bridge in the root netns, the upstream's netns on it.
    const br = this.#localBridge
    await ip('link', 'add', br, 'type', 'bridge')
    await ip('addr', 'add', `${p}.1.1/24`, 'dev', br)
    await ip('link', 'set', br, 'up')
    await ip('link', 'add', `${base}l0`, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', l)
    await ip('link', 'set', `${base}l0`, 'master', br, 'up')
    await ip('-n', l, 'addr', 'add', `${p}.1.2/24`, 'dev', 'eth0')
    await ip('-n', l, 'link', 'set', 'eth0', 'up')
    await ip('-n', l, 'route', 'add', 'default', 'via', `${p}.1.1`)
    // remote: node B on an underlay veth, routing to its own bridge.
    await ip('link', 'add', `${base}u0`, 'type', 'veth', 'peer', 'name', 'underlay', 'netns', b)
    await ip('addr', 'add', `${p}.0.1/30`, 'dev', `${base}u0`)
    await ip('link', 'set', `${base}u0`, 'up')
    await ip('-n', b, 'addr', 'add', `${p}.0.2/30`, 'dev', 'underlay')
    await ip('-n', b, 'link', 'set', 'underlay', 'up')
    await run('ip', ['netns', 'exec', b, 'sysctl', '-qw', 'net.ipv4.ip_forward=1'])
    await ip('-n', b, 'link', 'add', 'br0', 'type', 'bridge')
    await ip('-n', b, 'addr', 'add', `${p}.2.1/24`, 'dev', 'br0')
    await ip('-n', b, 'link', 'set', 'br0', 'up')
    await ip('-n', b, 'link', 'add', 'vm0', 'type', 'veth', 'peer', 'name', 'eth0', 'netns', r)
    await ip('-n', b, 'link', 'set', 'vm0', 'master', 'br0', 'up')
    await ip('-n', r, 'addr', 'add', `${p}.2.2/24`, 'dev', 'eth0')
    await ip('-n', r, 'link', 'set', 'eth0', 'up')
    await ip('-n', r, 'route', 'add', 'default', 'via', `${p}.2.1`)
    await ip('route', 'add', `${p}.2.0/24`, 'via', `${p}.0.2`)
  }

  /** How the remote path is routed, for the report. */
  describe (): string {
    const p = this.#prefix
    return `local: root netns → bridge ${this.#localBridge} (${p}.1.1/24) → veth → netns ${this.localNetns} (${this.localHost}); ` +
      `remote: root netns → veth underlay (${p}.0.1/30) → netns ${this.nodeBNetns} ("node B", ip_forward) → its bridge (${p}.2.1/24) → veth → netns ${this.remoteNetns} (${this.remoteHost})`
  }

  /**
   * Removes everything (idempotent), synchronously so that an exit handler
   * can call it: deleting a netns deletes its veths and their peers in the
   * root netns, and with the underlay goes the route. Throws the first
   * failures after trying every step.
   */
  destroy (): void {
    if (this.#destroyed) return
    this.#destroyed = true
    const failures: string[] = []
    const tryIp = (args: string[], gone: RegExp): void => {
      try {
        execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] })
      } catch (err) {
        const stderr = String((err as { stderr?: Buffer }).stderr ?? '')
        if (!gone.test(stderr)) failures.push(`ip ${args.join(' ')}: ${stderr.trim() || String(err)}`)
      }
    }
    for (const ns of [this.remoteNetns, this.nodeBNetns, this.localNetns]) tryIp(['netns', 'del', ns], /No such file|not found/i)
    tryIp(['link', 'del', this.#localBridge], /Cannot find device|does not exist/i)
    if (failures.length > 0) throw new Error(`clean-up of the hop topology ${this.tag} left parts behind:\n${failures.join('\n')}`)
  }
}
