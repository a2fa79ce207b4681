import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { basename, isAbsolute, join } from 'node:path'
import { run, type RunResult } from '../../src/core/exec.js'

/**
 * A cluster of hosts on one machine, for the cluster tests and benches: an
 * underlay bridge in the root network namespace, one namespace per node
 * joined to it by a veth, routes from the root namespace to every node's VM
 * subnet (the test process is "a client on the underlay"), and etcd members
 * running inside the nodes. Everything it makes carries the lab's name, and
 * close() (also run at process exit) removes all of it.
 *
 * Node numbers count from 1, as the names and addresses do: node 1 is `n1`,
 * 192.168.250.11, subnet 10.78.1.0/24, and etcd member 1 runs in it.
 * `lab.nodes` lists them in order (nodes[0] is n1); `lab.node(1)` is n1.
 */
export interface ClusterLab {
  /** The lab's name: the prefix of every namespace and link it makes. */
  readonly name: string
  /** The underlay bridge in the root namespace, e.g. `uiglab0`. */
  readonly bridge: string
  /** The underlay network, e.g. `192.168.250.0/24`. */
  readonly underlay: string
  /** The root namespace's address on the underlay (every node's default route), e.g. `192.168.250.1`. */
  readonly hostAddress: string
  /** The range that holds every node's VM subnet, e.g. `10.78.0.0/16`: a firewall's clusterRange. */
  readonly clusterRange: string
  /** Temporary directory holding the nodes' data dirs, etcd's data and the logs. */
  readonly dir: string
  readonly nodes: LabNode[]
  /** The etcd client URLs, member 1 first; empty with `etcdMembers: 0`. */
  readonly etcdEndpoints: string[]
  readonly etcd: LabEtcd
  /** Node `i` (1-based); throws for a node the lab does not have. */
  node: (i: number) => LabNode
  /**
   * Runs a process in node i's namespace, stdout and stderr appended to
   * `log` (a path, or a file name under the lab's log directory; by default
   * one is made up: `logPath` says which). close() kills it if it still runs.
   */
  spawn: (i: number, command: string, args: string[], options?: { env?: NodeJS.ProcessEnv, log?: string }) => LabProcess
  /** Runs a short command in node i's namespace and returns its output; rejects when it fails. */
  exec: (i: number, command: string, args: string[]) => Promise<RunResult>
  /**
   * A network namespace standing in for a VM on node i (no VM here): joined
   * by a veth to `bridge` inside node i's namespace, with `address` (CIDR)
   * and a default route via `gateway`. Removed by close().
   */
  addFakeGuest: (i: number, options: { bridge: string, address: string, gateway: string }) => Promise<FakeGuest>
  /** Kills what the lab started and removes everything it made. Idempotent. */
  close: () => Promise<void>
}

export interface LabNode {
  /** 1-based. */
  index: number
  /** `n1`, `n2`, ...: the node's name in the cluster. */
  name: string
  /** Its network namespace, e.g. `uiglab-n1`. */
  ns: string
  /** Its address on the underlay, e.g. `192.168.250.11`. */
  underlay: string
  /** Its VM subnet, e.g. `10.78.1.0/24`. */
  subnet: string
  dataDir: string
  socket: string
  apiUrl: string
  gatewayUrl: string
}

export interface LabEtcd {
  /** SIGKILLs member j (1-based) and waits until it is gone. */
  kill: (j: number) => Promise<void>
  /** Starts member j again with its data dir: it rejoins the cluster. No-op when it runs. */
  start: (j: number) => void
  /** Waits until every running member answers healthy (it has a leader); rejects after `timeoutMs`. */
  waitHealthy: (timeoutMs?: number) => Promise<void>
  /** Whether member j runs. */
  running: (j: number) => boolean
}

export type LabProcess = ChildProcess & { logPath: string }

export interface FakeGuest {
  ns: string
  /** Its address, without the prefix length. */
  address: string
  exec: (command: string, args: string[]) => Promise<RunResult>
  spawn: (command: string, args: string[], options?: { log?: string }) => LabProcess
}

const DEFAULT_NAME = 'uiglab'
/** Bridge `NAME0` and veths `NAME-nI` must fit IFNAMSIZ (15). */
const NAME = /^[a-z][a-z0-9]{1,9}$/
/** Marks the bridge as a lab's, with the pid that owns it, so that a stale one can be told from a stranger's. */
const ALIAS_PREFIX = 'uigniter-cluster-lab'
const ETCD = '/usr/bin/etcd'

/**
 * Starts a lab and waits until its etcd cluster (if any) is healthy.
 *
 * @example
 * const lab = await startClusterLab({ nodes: 3 })
 * t.after(async () => await lab.close())
 * const daemon = lab.spawn(1, process.execPath, ['dist/src/daemon/main.js', 'daemon'], { env: { UIGNITER_ETCD: lab.etcdEndpoints.join(',') } })
 */
export async function startClusterLab (options: { nodes: number, etcdMembers?: number, name?: string }): Promise<ClusterLab> {
  const name = options.name ?? DEFAULT_NAME
  if (!NAME.test(name)) throw new TypeError(`lab name "${name}" must be 2 to 10 lowercase letters or digits, starting with a letter`)
  const count = options.nodes
  const members = options.etcdMembers ?? count
  if (!Number.isInteger(count) || count < 1 || count > 20) throw new TypeError('a lab has 1 to 20 nodes')
  if (!Number.isInteger(members) || members < 0 || members > count) throw new TypeError(`etcdMembers must be 0 to ${count} (one member per node at most)`)
  if (process.geteuid?.() !== 0) throw new Error('the cluster lab needs root (network namespaces, veths, a bridge)')

  const lab = new Lab(name, count, members)
  try {
    await lab.up()
  } catch (err) {
    await lab.close()
    throw err
  }
  return lab.api()
}

/** Which underlay and VM range a lab name gets: the default lab's are the documented ones. */
function slotOf (name: string): number {
  if (name === DEFAULT_NAME) return 0
  return 1 + (createHash('sha256').update(name).digest().readUInt32BE(0) % 40)
}

function ipSync (args: string[], input?: string): { ok: boolean, stdout: string, stderr: string } {
  const r = spawnSync('ip', args, { input, encoding: 'utf8' })
  return { ok: r.status === 0, stdout: r.stdout ?? '', stderr: r.stderr ?? '' }
}

function pidAlive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

class Lab {
  readonly name: string
  readonly bridge: string
  readonly slot: number
  readonly octet: number
  readonly dir: string
  readonly nodes: LabNode[]
  readonly memberCount: number
  readonly #processes = new Set<ChildProcess>()
  readonly #etcd = new Map<number, ChildProcess>()
  readonly #guests: string[] = []
  readonly #token = randomBytes(4).toString('hex')
  #closed = false
  /** Until the bridge is known to be ours (or absent), close() must not touch a stranger's things of the same names. */
  #claimed = false
  #logCounter = 0
  readonly #onExit = (): void => this.#teardownSync()
  readonly #onSignal = (signal: NodeJS.Signals): void => {
    this.#teardownSync()
    // The default action, now that the handler is gone: the runner sees the signal.
    process.kill(process.pid, signal)
  }

  constructor (name: string, count: number, members: number) {
    this.name = name
    this.bridge = `${name}0`
    this.slot = slotOf(name)
    this.octet = 250 - this.slot
    this.memberCount = members
    this.dir = mkdtempSync(join(tmpdir(), `uigniter-lab-${name}-`))
    mkdirSync(join(this.dir, 'logs'))
    this.nodes = []
    for (let i = 1; i <= count; i++) {
      const underlay = `192.168.${this.octet}.${10 + i}`
      const dataDir = join(this.dir, `n${i}`)
      mkdirSync(dataDir)
      this.nodes.push({
        index: i,
        name: `n${i}`,
        ns: `${name}-n${i}`,
        underlay,
        subnet: `10.${78 + this.slot}.${i}.0/24`,
        dataDir,
        socket: join(dataDir, 'uigniter.sock'),
        apiUrl: `http://${underlay}:7377`,
        gatewayUrl: `http://${underlay}:7380`
      })
    }
  }

  get hostAddress (): string { return `192.168.${this.octet}.1` }
  get underlay (): string { return `192.168.${this.octet}.0/24` }
  get clusterRange (): string { return `10.${78 + this.slot}.0.0/16` }
  get etcdEndpoints (): string[] { return this.nodes.slice(0, this.memberCount).map((n) => `http://${n.underlay}:2379`) }

  node (i: number): LabNode {
    const node = this.nodes[i - 1]
    if (node === undefined) throw new RangeError(`the lab has nodes 1 to ${this.nodes.length}, not ${i}`)
    return node
  }

  async up (): Promise<void> {
    this.#claimBridge()
    process.once('exit', this.#onExit)
    process.once('SIGINT', this.#onSignal)
    process.once('SIGTERM', this.#onSignal)
    const commands: string[] = [
      `link add ${this.bridge} type bridge`,
      `link set dev ${this.bridge} alias ${ALIAS_PREFIX}:${this.name}:${process.pid}:${this.dir}`,
      `addr add ${this.hostAddress}/24 dev ${this.bridge}`,
      `link set dev ${this.bridge} up`
    ]
    for (const n of this.nodes) {
      commands.push(
        `netns add ${n.ns}`,
        `link add ${n.ns} type veth peer name eth0 netns ${n.ns}`,
        `link set dev ${n.ns} master ${this.bridge} up`
      )
    }
    await batch(undefined, commands)
    for (const n of this.nodes) {
      await batch(n.ns, [
        'link set dev lo up',
        `addr add ${n.underlay}/24 dev eth0`,
        'link set dev eth0 up',
        `route add default via ${this.hostAddress}`
      ])
    }
    // The test process, a client on the underlay, reaches every node's VMs directly.
    await batch(undefined, this.nodes.map((n) => `route replace ${n.subnet} via ${n.underlay} dev ${this.bridge}`))
    // One process for every node's forwarding switch.
    await run('sh', ['-c', this.nodes.map((n) => `ip netns exec ${n.ns} sysctl -qw net.ipv4.ip_forward=1`).join(' && ')])
    for (let j = 1; j <= this.memberCount; j++) this.startEtcd(j)
    if (this.memberCount > 0) await this.waitHealthy(60_000)
  }

  /** Refuses a bridge of the same name that is not a lab's, or a live lab's; removes a crashed lab's leftovers. */
  #claimBridge (): void {
    const aliasFile = `/sys/class/net/${this.bridge}/ifalias`
    if (existsSync(`/sys/class/net/${this.bridge}`)) {
      const alias = existsSync(aliasFile) ? readFileSync(aliasFile, 'utf8').trim() : ''
      const m = new RegExp(`^${ALIAS_PREFIX}:${this.name}:(\\d+):(.*)$`).exec(alias)
      if (m?.[1] === undefined) throw new Error(`${this.bridge} exists and is not a cluster lab's bridge; choose another lab name`)
      const owner = Number(m[1])
      if (owner !== process.pid && pidAlive(owner)) throw new Error(`the lab "${this.name}" is in use by process ${owner}; choose another lab name or end that run`)
      const staleDir = m[2] ?? ''
      if (staleDir.startsWith(join(tmpdir(), `uigniter-lab-${this.name}-`)) && !staleDir.includes('..')) rmSync(staleDir, { recursive: true, force: true })
    }
    this.#claimed = true
    // A crashed run leaves its namespaces, veths and bridge (and maybe processes in the namespaces).
    this.#teardownSync(true)
    const addresses = ipSync(['-j', '-4', 'addr']).stdout
    for (const link of JSON.parse(addresses === '' ? '[]' : addresses) as Array<{ ifname: string, addr_info?: Array<{ local: string }> }>) {
      for (const a of link.addr_info ?? []) {
        if (a.local.startsWith(`192.168.${this.octet}.`)) throw new Error(`${link.ifname} already has ${a.local}, in the lab's underlay ${this.underlay}; remove it or choose another lab name`)
      }
    }
    const routes = ipSync(['-4', 'route', 'show', 'root', this.clusterRange]).stdout.trim()
    if (routes !== '') throw new Error(`routes into the lab's VM range ${this.clusterRange} exist already (${routes.split('\n')[0] ?? ''}); remove them or choose another lab name`)
  }

  spawnIn (ns: string, command: string, args: string[], options: { env?: NodeJS.ProcessEnv, log?: string } = {}): LabProcess {
    if (this.#closed) throw new Error('the lab is closed')
    const logPath = options.log === undefined
      ? join(this.dir, 'logs', `${ns}-${basename(command)}-${++this.#logCounter}.log`)
      : isAbsolute(options.log) ? options.log : join(this.dir, 'logs', options.log)
    const fd = openSync(logPath, 'a')
    try {
      const child = spawn('ip', ['netns', 'exec', ns, command, ...args], { env: { ...process.env, ...options.env }, stdio: ['ignore', fd, fd] })
      this.#processes.add(child)
      child.once('exit', () => this.#processes.delete(child))
      // A missing program is the log's to tell; the test sees the exit.
      child.on('error', () => {})
      return Object.assign(child, { logPath })
    } finally {
      closeSync(fd)
    }
  }

  startEtcd (j: number): void {
    if (j < 1 || j > this.memberCount) throw new RangeError(`the lab has etcd members 1 to ${this.memberCount}, not ${j}`)
    if (this.#etcd.has(j)) return
    const node = this.node(j)
    const initial = this.nodes.slice(0, this.memberCount).map((n) => `m${n.index}=http://${n.underlay}:2380`).join(',')
    const child = this.spawnIn(node.ns, ETCD, [
      '--name', `m${j}`,
      '--data-dir', join(this.dir, `etcd-m${j}`),
      '--listen-client-urls', `http://${node.underlay}:2379`,
      '--advertise-client-urls', `http://${node.underlay}:2379`,
      '--listen-peer-urls', `http://${node.underlay}:2380`,
      '--initial-advertise-peer-urls', `http://${node.underlay}:2380`,
      // Ignored once the data dir holds a member: a restart rejoins.
      '--initial-cluster', initial,
      '--initial-cluster-state', 'new',
      '--initial-cluster-token', `${this.name}-${this.#token}`,
      '--logger', 'zap',
      '--log-outputs', 'stderr'
    ], { log: `etcd-m${j}.log` })
    this.#etcd.set(j, child)
    child.once('exit', () => { if (this.#etcd.get(j) === child) this.#etcd.delete(j) })
  }

  async killEtcd (j: number): Promise<void> {
    const child = this.#etcd.get(j)
    if (child === undefined) return
    this.#etcd.delete(j)
    await killAndWait(child, 'SIGKILL', 0)
  }

  async waitHealthy (timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs
    let last = ''
    while (true) {
      const running = [...this.#etcd.keys()].map((j) => this.node(j))
      const answers = await Promise.all(running.map(async (n) => await etcdHealth(n.underlay)))
      if (answers.every((a) => a === 'true')) return
      last = running.map((n, k) => `m${n.index}: ${answers[k] ?? '?'}`).join(', ')
      if (Date.now() > deadline) {
        const logs = running.map((n) => `--- etcd m${n.index}\n${tail(join(this.dir, 'logs', `etcd-m${n.index}.log`))}`).join('\n')
        throw new Error(`etcd is not healthy after ${timeoutMs} ms (${last})\n${logs}`)
      }
      await new Promise((resolve) => setTimeout(resolve, 200))
    }
  }

  async addFakeGuest (i: number, options: { bridge: string, address: string, gateway: string }): Promise<FakeGuest> {
    const node = this.node(i)
    const k = this.#guests.length + 1
    const ns = `${this.name}-fake-guest${k}`
    // The node side's name lives in the node's namespace alone; the guest's is eth0, as in a VM.
    const hostSide = `fakeguest${k}`
    this.#guests.push(ns)
    await batch(undefined, [`netns add ${ns}`])
    await batch(node.ns, [
      `link add ${hostSide} type veth peer name eth0 netns ${ns}`,
      `link set dev ${hostSide} master ${options.bridge} up`
    ])
    await batch(ns, [
      'link set dev lo up',
      `addr add ${options.address} dev eth0`,
      'link set dev eth0 up',
      `route add default via ${options.gateway}`
    ])
    return {
      ns,
      address: options.address.split('/')[0] ?? options.address,
      exec: async (command, args) => await run('ip', ['netns', 'exec', ns, command, ...args]),
      spawn: (command, args, spawnOptions) => this.spawnIn(ns, command, args, spawnOptions ?? {})
    }
  }

  async close (): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    // etcd's data goes with the lab: no need for its graceful stop (a leader transfer, seconds).
    await Promise.all([...this.#etcd.keys()].map(async (j) => await this.killEtcd(j)))
    // The rest gracefully first (a daemon's own cleanup), then without mercy.
    await Promise.all([...this.#processes].map(async (child) => await killAndWait(child, 'SIGTERM', 3000)))
    this.#teardownSync()
    rmSync(this.dir, { recursive: true, force: true })
  }

  /**
   * Synchronous, for the exit handler: SIGKILLs whatever runs in the lab's
   * namespaces (etcd, daemons, QEMUs), deletes the namespaces (their veths
   * go with them), the bridge and, with it, the routes through it.
   * `stale`: a crashed run's leftovers, found by name rather than by what this run made.
   */
  #teardownSync (stale = false): void {
    if (!this.#claimed) return
    if (!stale) {
      process.removeListener('exit', this.#onExit)
      process.removeListener('SIGINT', this.#onSignal)
      process.removeListener('SIGTERM', this.#onSignal)
    }
    for (const child of this.#processes) child.kill('SIGKILL')
    const listed = ipSync(['netns', 'list']).stdout.split('\n').map((l) => l.split(' ')[0] ?? '')
    const namespaces = listed.filter((ns) => ns.startsWith(`${this.name}-n`) || ns.startsWith(`${this.name}-fake-guest`))
    for (const ns of namespaces) {
      for (const pid of ipSync(['netns', 'pids', ns]).stdout.split('\n').filter((p) => /^\d+$/.test(p))) {
        try { process.kill(Number(pid), 'SIGKILL') } catch { /* exited meanwhile */ }
      }
    }
    const commands = namespaces.map((ns) => `netns del ${ns}`)
    // A veth outlives its namespace while a killed process in it is still exiting.
    for (const n of this.nodes) commands.push(`link del ${n.ns}`)
    commands.push(`link del ${this.bridge}`)
    ipSync(['-force', '-batch', '-'], commands.join('\n') + '\n')
    if (!stale) this.#processes.clear()
  }

  api (): ClusterLab {
    return {
      name: this.name,
      bridge: this.bridge,
      underlay: this.underlay,
      hostAddress: this.hostAddress,
      clusterRange: this.clusterRange,
      dir: this.dir,
      nodes: this.nodes,
      etcdEndpoints: this.etcdEndpoints,
      etcd: {
        kill: async (j) => await this.killEtcd(j),
        start: (j) => this.startEtcd(j),
        waitHealthy: async (timeoutMs) => await this.waitHealthy(timeoutMs),
        running: (j) => this.#etcd.has(j)
      },
      node: (i) => this.node(i),
      spawn: (i, command, args, options) => this.spawnIn(this.node(i).ns, command, args, options ?? {}),
      exec: async (i, command, args) => await run('ip', ['netns', 'exec', this.node(i).ns, command, ...args]),
      addFakeGuest: async (i, options) => await this.addFakeGuest(i, options),
      close: async () => await this.close()
    }
  }
}

/** `ip -batch` in the root namespace or in `ns` (a batch line takes no `-n`). */
async function batch (ns: string | undefined, commands: string[]): Promise<void> {
  const args = [...(ns === undefined ? [] : ['-n', ns]), '-batch', '-']
  const { code, stderr } = await new Promise<{ code: number | null, stderr: string }>((resolve, reject) => {
    const child = spawn('ip', args, { stdio: ['pipe', 'ignore', 'pipe'] })
    let err = ''
    child.stderr.on('data', (c: Buffer) => { err += c.toString() })
    child.on('error', reject)
    child.on('close', (c) => resolve({ code: c, stderr: err }))
    child.stdin.on('error', () => {})
    child.stdin.end(commands.join('\n') + '\n')
  })
  if (code !== 0) throw new Error(`ip ${args.join(' ')} failed${ns === undefined ? '' : ` in ${ns}`}: ${stderr.trim().split('\n').slice(0, 6).join('; ')}`)
}

/** etcd's own /health: "true" once the member has a leader and no alarm. */
async function etcdHealth (address: string): Promise<string> {
  try {
    const res = await fetch(`http://${address}:2379/health`, { signal: AbortSignal.timeout(1000) })
    const body = await res.json() as { health?: string }
    return body.health ?? 'no answer'
  } catch (err) {
    return (err as { cause?: { code?: string } }).cause?.code ?? (err as Error).name
  }
}

async function killAndWait (child: ChildProcess, signal: NodeJS.Signals, graceMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  child.kill(signal)
  if (signal !== 'SIGKILL') {
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs)
    await exited
    clearTimeout(timer)
  } else await exited
}

function tail (path: string): string {
  try {
    return readFileSync(path, 'utf8').split('\n').slice(-15).join('\n')
  } catch {
    return '(no log)'
  }
}
