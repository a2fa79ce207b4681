import { access, readFile, writeFile } from 'node:fs/promises'
import { UigniterError, hasErrno } from '../core/errors.js'
import { assertPortFree } from './assert-port-free.js'
import { INTERFACE_NAME } from './bridge.js'
import type { Firewall, FirewallBase, PortPublish, PublishedPort } from './firewall.js'
import { runNetTool } from './net-tool.js'
import { parseIpv4 } from './subnet.js'

/** VM ids travel inside rule comments: keep them to characters that need no quoting. */
const VM_ID = /^[A-Za-z0-9_.-]{1,64}$/
const TABLE_NAME = /^[A-Za-z][A-Za-z0-9_]{0,31}$/

/**
 * Each port forward is one rule in the `publish` chain whose comment says
 * whose it is and what it does, so that the rules can be found again after a
 * restart without any state of our own: the firewall is the record.
 */
const COMMENT = /^uigniter vm=([A-Za-z0-9_.-]+) tcp ([0-9.]+):([0-9]+)->([0-9.]+):([0-9]+)$/

const NO_SUCH = /No such file or directory/

interface NftRule { rule?: { chain: string, handle: number, comment?: string } }

/**
 * The Firewall on nftables: one `ip` table (default `uigniter`) holding
 * every rule. Base chains are rewritten by ensureBase() in one atomic batch;
 * port forwards live in the `publish` chain, which ensureBase() keeps.
 * Operations of one instance run one at a time, so two publishes of the same
 * port cannot both pass the check.
 */
export class NftFirewall implements Firewall {
  readonly backend = 'nftables'
  readonly table: string
  #queue: Promise<unknown> = Promise.resolve()
  /**
   * How many port forwards each VM has, as of the last listing and this
   * instance's changes since; undefined until the first listing. It lets
   * unpublishAll() skip the `nft` process for a VM with none, which is every
   * VM that publishes nothing: one process less per VM that ends. It holds
   * because the table is this instance's alone (a daemon has one firewall).
   */
  #known: Map<string, number> | undefined

  constructor (options: { table: string }) {
    if (!TABLE_NAME.test(options.table)) throw new TypeError(`"${options.table}" is not a valid nftables table name`)
    this.table = options.table
  }

  async ensureBase (base: FirewallBase): Promise<void> {
    const { bridge, subnet, nat, clusterRange } = base
    if (!INTERFACE_NAME.test(bridge)) throw new TypeError(`"${bridge}" is not a valid interface name`)
    if (clusterRange !== undefined && (clusterRange.prefix > subnet.prefix || !clusterRange.contains(subnet.network))) {
      throw new UigniterError('UIG_ERR_NET_INVALID_SUBNET', `the cluster range ${clusterRange.cidr} must hold this node's VM subnet ${subnet.cidr}`)
    }
    const ports = base.allowedHostPorts ?? []
    for (const port of ports) assertPort(port)
    const nodes = [...new Set(base.clusterNodes ?? [])].sort()
    for (const address of nodes) {
      if (parseIpv4(address) === undefined) throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `cluster node address "${address}" is not an IPv4 address`)
    }
    const toNodes = nodes.length === 0 ? undefined : `ip daddr { ${nodes.join(', ')} }`
    const t = `ip ${this.table}`
    const br = `"${bridge}"`
    const cluster = clusterRange?.cidr
    // Other nodes' VMs come in from the underlay; "lo" carries the host's own packets, which may have the bridge's address.
    const fromCluster = cluster === undefined ? '' : `iifname != ${br} iifname != "lo" ip saddr ${cluster}`
    const lines = [
      `add table ${t}`,
      `add chain ${t} publish`,
      // Guard: a VM may only speak from its subnet, and never to loopback
      // addresses, which route_localnet would otherwise let in from the bridge.
      `add chain ${t} guard { type filter hook prerouting priority raw; policy accept; }`,
      `flush chain ${t} guard`,
      // A DHCP client has no address yet: it asks from 0.0.0.0, to the broadcast address.
      ...(base.dhcp === true ? [`add rule ${t} guard iifname ${br} ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept`] : []),
      `add rule ${t} guard iifname ${br} ip saddr != ${subnet.cidr} drop`,
      `add rule ${t} guard iifname ${br} ip daddr 127.0.0.0/8 drop`,
      ...(cluster === undefined ? [] : [`add rule ${t} guard ${fromCluster} ip daddr 127.0.0.0/8 drop`]),
      // Published ports, for traffic from elsewhere; never for traffic from
      // VMs, so that one VM cannot reach another's published ports via the host.
      `add chain ${t} prerouting { type nat hook prerouting priority dstnat; policy accept; }`,
      `flush chain ${t} prerouting`,
      `add rule ${t} prerouting iifname ${br} return`,
      // Other nodes' VMs are VMs too.
      ...(cluster === undefined ? [] : [`add rule ${t} prerouting ${fromCluster} return`]),
      `add rule ${t} prerouting fib daddr type local jump publish`,
      // ... and for traffic from the host itself, 127.0.0.1 included.
      `add chain ${t} output { type nat hook output priority -100; policy accept; }`,
      `flush chain ${t} output`,
      `add rule ${t} output fib daddr type local jump publish`,
      `add chain ${t} postrouting { type nat hook postrouting priority srcnat; policy accept; }`,
      `flush chain ${t} postrouting`,
      // A VM cannot answer 127.0.0.1: give such connections the gateway as source.
      `add rule ${t} postrouting oifname ${br} ip saddr 127.0.0.0/8 masquerade`,
      // VM egress. Not the host's own packets from the gateway address: those
      // to its own addresses pass postrouting too, and would lose their source.
      // Not towards other nodes' VMs either: they see this VM's own address.
      ...(nat ? [`add rule ${t} postrouting ip saddr ${subnet.cidr}${cluster === undefined ? '' : ` ip daddr != ${cluster}`}${toNodes === undefined ? '' : ` ip daddr != { ${nodes.join(', ')} }`} oifname != ${br} fib saddr type != local masquerade`] : []),
      // VMs reach no host service (the API, sshd, anything on the gateway or
      // the host's other addresses), except answers to the host's own
      // connections and the allowed ports.
      `add chain ${t} input { type filter hook input priority filter; policy accept; }`,
      `flush chain ${t} input`,
      `add rule ${t} input iifname ${br} ct state established,related accept`,
      ...(ports.length > 0 ? [`add rule ${t} input iifname ${br} ip daddr ${subnet.gateway} tcp dport { ${ports.join(', ')} } accept`] : []),
      // The bridge's DHCP server (dnsmasq, bound to the bridge alone): discovers, requests and renewals.
      ...(base.dhcp === true ? [`add rule ${t} input iifname ${br} udp sport 68 udp dport 67 accept`] : []),
      `add rule ${t} input iifname ${br} drop`,
      // The same for other nodes' VMs, on any address of this host (their way in is not the gateway address).
      ...(cluster === undefined
        ? []
        : [`add rule ${t} input ${fromCluster} ct state established,related accept`,
            ...(ports.length > 0 ? [`add rule ${t} input ${fromCluster} tcp dport { ${ports.join(', ')} } accept`] : []),
            `add rule ${t} input ${fromCluster} drop`]),
      // Without NAT, VM traffic must not leave the host with private source
      // addresses; answers to forwarded published ports still may.
      `add chain ${t} forward { type filter hook forward priority filter; policy accept; }`,
      `flush chain ${t} forward`,
      // Other nodes' own services are host services too: only the allowed ports, and answers to their connections.
      ...(toNodes === undefined
        ? []
        : [`add rule ${t} forward iifname ${br} ${toNodes} ct state established,related accept`,
            ...(ports.length > 0 ? [`add rule ${t} forward iifname ${br} ${toNodes} tcp dport { ${ports.join(', ')} } accept`] : []),
            `add rule ${t} forward iifname ${br} ${toNodes} drop`]),
      ...(nat
        ? []
        : [`add rule ${t} forward iifname ${br} oifname != ${br} ct state established,related accept`,
            // Other nodes' VMs are not "outside": their addresses are routed, not NATed.
            ...(cluster === undefined ? [] : [`add rule ${t} forward iifname ${br} ip daddr ${cluster} accept`]),
            `add rule ${t} forward iifname ${br} oifname != ${br} drop`])
    ]
    await this.#serial(async () => {
      const localnet = `/proc/sys/net/ipv4/conf/${bridge}/route_localnet`
      try {
        await access(localnet)
      } catch (err) {
        if (!hasErrno(err, 'ENOENT')) throw err
        throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `bridge ${bridge} does not exist; create it before the firewall rules (ensureBridge)`)
      }
      await this.#apply(lines)
      await setSysctl('/proc/sys/net/ipv4/ip_forward', '1')
      // Lets the output DNAT send 127.0.0.1-sourced packets out of the bridge
      // (to be masqueraded); the guard chain drops loopback traffic coming in.
      await setSysctl(localnet, '1')
    })
  }

  async publish (vmId: string, rule: PortPublish): Promise<void> {
    assertVmId(vmId)
    assertPublish(rule)
    await this.#serial(async () => {
      const existing = await this.#listRules()
      if (existing.some((r) => r.vmId === vmId && samePublish(r, rule))) return
      const clash = existing.find((r) => r.hostPort === rule.hostPort && addressesOverlap(r.hostAddress, rule.hostAddress))
      if (clash !== undefined) {
        throw new UigniterError('UIG_ERR_NET_PORT_IN_USE',
          `host port ${rule.hostAddress}:${rule.hostPort} is already published for VM ${clash.vmId} (${clash.hostAddress}:${clash.hostPort}); publish another host port`)
      }
      await assertPortFree(rule.hostAddress, rule.hostPort)
      await this.#apply([this.#addRule(vmId, rule)])
      this.#known?.set(vmId, (this.#known.get(vmId) ?? 0) + 1)
    })
  }

  async unpublish (vmId: string, rule: PortPublish): Promise<void> {
    assertVmId(vmId)
    await this.#remove((r) => r.vmId === vmId && samePublish(r, rule))
  }

  async unpublishAll (vmId: string): Promise<void> {
    // An owner that publish() refuses (a template's VM, "template:NAME") holds no rule: nothing to remove.
    if (!VM_ID.test(vmId)) return
    await this.#remove((r) => r.vmId === vmId, vmId)
  }

  /** `onlyOf`: the rules are all of this VM, so a VM known to have none needs no listing. */
  async #remove (which: (rule: PublishedPort) => boolean, onlyOf?: string): Promise<void> {
    await this.#serial(async () => {
      if (onlyOf !== undefined && this.#known !== undefined && !this.#known.has(onlyOf)) return
      const doomed = (await this.#listRules()).filter(which)
      await this.#apply(doomed.map((r) => this.#deleteRule(r.handle)))
      for (const r of doomed) {
        const left = (this.#known?.get(r.vmId) ?? 1) - 1
        if (left > 0) this.#known?.set(r.vmId, left)
        else this.#known?.delete(r.vmId)
      }
    })
  }

  async listPublished (): Promise<PublishedPort[]> {
    return await this.#serial(async () => (await this.#listRules()).map(({ handle: _handle, ...published }) => published))
  }

  async reconcile (expected: Array<{ vmId: string, publishes?: PortPublish[] }>): Promise<void> {
    for (const { vmId, publishes } of expected) {
      assertVmId(vmId)
      for (const p of publishes ?? []) assertPublish(p)
    }
    const wanted = new Map(expected.map((e) => [e.vmId, e.publishes]))
    await this.#serial(async () => {
      const existing = await this.#listRules()
      const lines: string[] = []
      for (const rule of existing) {
        const publishes = wanted.get(rule.vmId)
        const keep = wanted.has(rule.vmId) && (publishes === undefined || publishes.some((p) => samePublish(rule, p)))
        if (!keep) lines.push(this.#deleteRule(rule.handle))
      }
      for (const [vmId, publishes] of wanted) {
        for (const p of publishes ?? []) {
          // Ours already: no port check; a host program taking the port meanwhile loses to the forward as before.
          if (!existing.some((r) => r.vmId === vmId && samePublish(r, p))) lines.push(this.#addRule(vmId, p))
        }
      }
      await this.#apply(lines)
      // Listed afresh next time.
      this.#known = undefined
    })
  }

  async destroy (): Promise<void> {
    await this.#serial(async () => {
      await runNetTool('nft', ['delete', 'table', 'ip', this.table], { tolerate: NO_SUCH })
      this.#known = new Map()
    })
  }

  #addRule (vmId: string, p: PortPublish): string {
    const match = p.hostAddress === '0.0.0.0' ? '' : `ip daddr ${p.hostAddress} `
    const comment = `uigniter vm=${vmId} tcp ${p.hostAddress}:${p.hostPort}->${p.vmIp}:${p.guestPort}`
    return `add rule ip ${this.table} publish ${match}tcp dport ${p.hostPort} dnat to ${p.vmIp}:${p.guestPort} comment "${comment}"`
  }

  #deleteRule (handle: number): string {
    return `delete rule ip ${this.table} publish handle ${handle}`
  }

  async #listRules (): Promise<Array<PublishedPort & { handle: number }>> {
    const stdout = await runNetTool('nft', ['-j', 'list', 'chain', 'ip', this.table, 'publish'], { tolerate: NO_SUCH })
    if (stdout === undefined) return []
    const items = (JSON.parse(stdout) as { nftables?: NftRule[] }).nftables ?? []
    const rules: Array<PublishedPort & { handle: number }> = []
    for (const item of items) {
      const m = item.rule?.comment === undefined ? null : COMMENT.exec(item.rule.comment)
      if (item.rule === undefined || m === null) continue
      const [, vmId = '', hostAddress = '', hostPort = '', vmIp = '', guestPort = ''] = m
      rules.push({ vmId, hostAddress, hostPort: Number(hostPort), vmIp, guestPort: Number(guestPort), handle: item.rule.handle })
    }
    const known = new Map<string, number>()
    for (const r of rules) known.set(r.vmId, (known.get(r.vmId) ?? 0) + 1)
    this.#known = known
    return rules
  }

  /** Runs the lines as one nft batch: all of them take effect, or none. */
  async #apply (lines: string[]): Promise<void> {
    if (lines.length === 0) return
    const missingTable = lines.every((l) => !l.startsWith('add table'))
    try {
      await runNetTool('nft', [lines.join('\n')])
    } catch (err) {
      if (missingTable && err instanceof UigniterError && NO_SUCH.test(err.message)) {
        throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `the firewall table ${this.table} is missing; set up the host network first (ensureBase)`, { cause: err })
      }
      throw err
    }
  }

  async #serial<T> (task: () => Promise<T>): Promise<T> {
    const result = this.#queue.then(task)
    this.#queue = result.catch(() => undefined)
    return await result
  }
}

function assertVmId (vmId: string): void {
  if (!VM_ID.test(vmId)) throw new TypeError(`VM id "${vmId}" must be 1 to 64 letters, digits, "_", "." or "-"`)
}

function assertPort (port: number): void {
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new UigniterError('UIG_ERR_NET_PUBLISH_INVALID', `${port} is not a port number (1 to 65535)`)
  }
}

function assertPublish (p: PortPublish): void {
  for (const address of [p.hostAddress, p.vmIp]) {
    if (parseIpv4(address) === undefined) throw new UigniterError('UIG_ERR_NET_PUBLISH_INVALID', `"${address}" is not an IPv4 address`)
  }
  assertPort(p.hostPort)
  assertPort(p.guestPort)
}

function samePublish (a: PortPublish, b: PortPublish): boolean {
  return a.hostAddress === b.hostAddress && a.hostPort === b.hostPort && a.vmIp === b.vmIp && a.guestPort === b.guestPort
}

/** 0.0.0.0 stands for every host address, so it overlaps them all. */
function addressesOverlap (a: string, b: string): boolean {
  return a === b || a === '0.0.0.0' || b === '0.0.0.0'
}

async function setSysctl (path: string, value: string): Promise<void> {
  // Written only when different: a change of ip_forward rewrites the forwarding setting of every interface.
  const current = (await readFile(path, 'utf8')).trim()
  if (current !== value) await writeFile(path, value)
}
