import { spawn, type ChildProcess } from 'node:child_process'
import { chmod, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { UigniterError, hasErrno } from '../core/errors.js'
import { tempSibling } from '../core/fs-atomic.js'
import type { Logger } from '../core/logger.js'
import { renderDhcpHosts, type DhcpHost, type DhcpHosts } from './dhcp-hosts.js'
import type { Subnet } from './subnet.js'

/** Debian's dnsmasq-base puts it here. */
export const DNSMASQ = '/usr/sbin/dnsmasq'

/**
 * Where each bridge's server keeps its pid file and hosts file. Not the data
 * dir: dnsmasq drops to `nobody` and reads the hosts file again as `nobody`
 * on SIGHUP, so every directory above it must be world-searchable, which a
 * data dir (a 0700 temp dir in tests) need not be. The table is only MACs
 * and addresses of this host's VMs, and /run is emptied at boot, as the
 * server's state should be.
 */
export const DHCP_STATE_ROOT = '/run/uigniter/dhcp'

export interface DhcpServerOptions {
  bridge: string
  subnet: Subnet
  /** The nameservers to hand out, read at each (re)start; none: no DNS option. */
  nameservers: () => Promise<string[]>
  /** Default `/run/uigniter/dhcp/BRIDGE`; removed by close(). */
  stateDir?: string
  /** The program and any arguments before dnsmasq's own; default `/usr/sbin/dnsmasq`. */
  command?: string[]
  logger?: Logger
  /** Restart delays after a failure: doubling from `initialMs` up to `maxMs`; default 1 s to 30 s. */
  backoff?: { initialMs: number, maxMs: number }
  /** How long a start may take before it counts as failed; default 10 s. */
  startTimeoutMs?: number
}

export type DhcpServerState = 'stopped' | 'starting' | 'running' | 'waiting' | 'failed'

export interface DhcpServerStatus {
  /** `waiting`: for its next restart after a failure; `failed`: given up (dnsmasq is not installed). */
  state: DhcpServerState
  pid: number | null
  /** Starts after the first. */
  restarts: number
  lastError: string | null
}

/** dnsmasq's log line of a lease given: `dnsmasq-dhcp[PID]: DHCPACK(BRIDGE) IP MAC [NAME]`. */
const DHCPACK = /DHCPACK\([^)]*\) ([0-9.]+) ([0-9a-fA-F:]{17})\b/

/** A run that lasted this long was healthy: the next failure starts the backoff afresh. */
const HEALTHY_RUN_MS = 10_000
const TAIL_LINES = 20

/**
 * The DHCP server of one bridge: a supervised dnsmasq that answers each
 * VM's MAC with the address uigniter allocated to it, the bridge's gateway
 * and the host's nameservers, and nothing else (static leases only: an
 * unknown MAC gets no answer). It serves unikernels that take their address
 * by DHCP; VMs with our init or a placeholder command line ignore it.
 *
 * Every request is hostile input, parsed by dnsmasq, a hardened server that
 * runs as `nobody`, not by us. `--bind-interfaces` lets one server per
 * bridge coexist with the others (several daemons, a host's own dnsmasq).
 * A server that dies is restarted with a backoff; a start that fails
 * rejects with UIG_ERR_NET_DHCP_FAILED and keeps being retried, so the
 * daemon can go on serving every VM that needs no DHCP.
 *
 * @example
 * const dhcp = new DhcpServer({ bridge: 'uigniter0', subnet, nameservers: async () => ['9.9.9.9'] })
 * await dhcp.setHosts([{ mac: '02:aa:bb:cc:dd:ee', ip: '10.77.0.2' }])
 * await dhcp.start()
 * await dhcp.close()
 */
export class DhcpServer implements DhcpHosts {
  readonly stateDir: string
  readonly hostsFile: string
  readonly pidFile: string
  readonly #options: DhcpServerOptions
  readonly #command: string[]
  readonly #backoff: { initialMs: number, maxMs: number }
  #hosts: DhcpHost[] = []
  /** Who holds each address in the running dnsmasq's memory, from its DHCPACK lines (see renderDhcpHosts). */
  readonly #leases = new Map<string, string>()
  #child: ChildProcess | undefined
  #state: DhcpServerState = 'stopped'
  #started = false
  #closed = false
  #timer: NodeJS.Timeout | undefined
  #failures = 0
  #restarts = 0
  #lastError: string | null = null
  #writes: Promise<void> = Promise.resolve()
  /** A write queued and not begun: later changes join it, since it renders the table as it is when it begins. */
  #queued: Promise<void> | undefined
  #reloadPending = false

  constructor (options: DhcpServerOptions) {
    if (!/^[A-Za-z0-9_.-]{1,15}$/.test(options.bridge)) throw new TypeError(`"${options.bridge}" is not a valid interface name`)
    this.#options = options
    this.stateDir = options.stateDir ?? join(DHCP_STATE_ROOT, options.bridge)
    this.hostsFile = join(this.stateDir, 'hosts')
    this.pidFile = join(this.stateDir, 'dnsmasq.pid')
    this.#command = options.command ?? [DNSMASQ]
    this.#backoff = options.backoff ?? { initialMs: 1000, maxMs: 30_000 }
  }

  status (): DhcpServerStatus {
    return { state: this.#state, pid: this.#state === 'running' ? this.#child?.pid ?? null : null, restarts: this.#restarts, lastError: this.#lastError }
  }

  /**
   * Starts the server: ends one a crashed daemon left on this bridge, writes
   * the table and runs dnsmasq until it has read it. Rejects with
   * UIG_ERR_NET_DHCP_FAILED when it cannot start, and retries in the
   * background until close() all the same. Call once.
   */
  async start (): Promise<void> {
    if (this.#started) throw new Error('DhcpServer.start() was called twice')
    this.#started = true
    try {
      await this.#endLeftover()
      await this.#enqueueWrite()
    } catch (err) {
      // Nowhere to keep the table (/run read-only, say): no server can ever run.
      this.#state = 'failed'
      throw new UigniterError('UIG_ERR_NET_DHCP_FAILED', `the DHCP server for bridge ${this.#options.bridge} cannot keep its files in ${this.stateDir}: ${(err as Error).message}`, { cause: err })
    }
    try {
      await this.#run()
    } catch (err) {
      this.#failed(err)
      throw err
    }
  }

  /**
   * Replaces the table and has a running server re-read it (SIGHUP). The
   * file is written whole under a temporary name and renamed, so dnsmasq
   * never reads half a table.
   */
  async setHosts (hosts: DhcpHost[]): Promise<void> {
    // Render now, so that a bad entry throws to the caller rather than in the queue.
    renderDhcpHosts(hosts)
    this.#hosts = [...hosts]
    if (!this.#started || this.#closed) return
    await this.#enqueueWrite()
  }

  /** Stops the server and removes its files; VMs keep the addresses they have (infinite leases). */
  async close (): Promise<void> {
    this.#closed = true
    clearTimeout(this.#timer)
    await this.#writes.catch(() => {})
    const child = this.#child
    if (child !== undefined && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve))
      child.kill('SIGTERM')
      const killer = setTimeout(() => child.kill('SIGKILL'), 5000)
      await exited
      clearTimeout(killer)
    }
    this.#child = undefined
    this.#state = 'stopped'
    await rm(this.stateDir, { recursive: true, force: true })
  }

  /**
   * One write (and one SIGHUP) for every change made while the previous
   * write ran: with VMs starting a few at a time, each start need not
   * rewrite the table, nor have dnsmasq re-read it, on its own.
   */
  async #enqueueWrite (): Promise<void> {
    if (this.#queued !== undefined) return await this.#queued
    const write = this.#writes.then(async () => {
      this.#queued = undefined
      if (this.#closed) return
      await this.#writeHosts()
      if (this.#state === 'running') this.#reload()
      // A server still starting may have read the old table: it re-reads once it is up.
      else if (this.#state === 'starting') this.#reloadPending = true
    })
    this.#queued = write
    this.#writes = write.catch(() => {})
    await write
  }

  async #writeHosts (): Promise<void> {
    // World-readable all the way down: dnsmasq re-reads the file as nobody.
    await mkdir(this.stateDir, { recursive: true, mode: 0o755 })
    await chmod(this.stateDir, 0o755)
    const tmp = tempSibling(this.hostsFile)
    try {
      await writeFile(tmp, renderDhcpHosts(this.#hosts, this.#leases), { mode: 0o644 })
      await chmod(tmp, 0o644)
      await rename(tmp, this.hostsFile)
    } catch (err) {
      await rm(tmp, { force: true })
      throw err
    }
  }

  #reload (): void {
    try {
      this.#child?.kill('SIGHUP')
    } catch (err) {
      this.#options.logger?.warn({ err }, 'could not signal the DHCP server to re-read its hosts')
    }
  }

  #args (nameservers: string[]): string[] {
    const { bridge, subnet } = this.#options
    return [
      '--keep-in-foreground',
      // Nothing of the host's /etc/dnsmasq.conf, and no DNS: only DHCP.
      '--conf-file=/dev/null', '--port=0', '--no-hosts', '--no-resolv',
      `--interface=${bridge}`, '--bind-interfaces', '--except-interface=lo',
      // static: only MACs of the hosts file get an address; nothing is handed out of a pool.
      `--dhcp-range=${subnet.network},static,${subnet.netmask},infinite`,
      `--dhcp-hostsfile=${this.hostsFile}`,
      // The bridge is ours alone: a client asking for a stale address hears a NAK at once instead of timing out.
      '--dhcp-authoritative',
      `--dhcp-option=option:router,${subnet.gateway}`,
      ...(nameservers.length > 0 ? [`--dhcp-option=option:dns-server,${nameservers.join(',')}`] : []),
      '--leasefile-ro', `--pid-file=${this.pidFile}`, '--log-facility=-'
    ]
  }

  /** One run of dnsmasq: resolves once it has read its hosts file, then follows it to its end. */
  async #run (): Promise<void> {
    this.#state = 'starting'
    const nameservers = await this.#options.nameservers().catch(() => [])
    if (this.#closed) throw new UigniterError('UIG_ERR_NET_DHCP_FAILED', `the DHCP server for bridge ${this.#options.bridge} was closed while it started`)
    // A new dnsmasq holds no lease.
    this.#leases.clear()
    const [program = DNSMASQ, ...pre] = this.#command
    const log = this.#options.logger
    const tail: string[] = []
    const child = spawn(program, [...pre, ...this.#args(nameservers)], { stdio: ['ignore', 'pipe', 'pipe'], detached: true })
    this.#child = child
    // A daemon that exits without close() (a failed start, an uncaught error) leaves no server behind;
    // after a SIGKILL the next daemon ends it (#endLeftover).
    const onExit = (): void => { child.kill('SIGKILL') }
    process.once('exit', onExit)
    child.once('exit', () => process.removeListener('exit', onExit))
    const startedAt = Date.now()
    let ready = false
    await new Promise<void>((resolve, reject) => {
      const fail = (err: UigniterError): void => {
        clearTimeout(timer)
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
        reject(err)
      }
      const timer = setTimeout(() => fail(this.#error(`it did not start within ${this.#options.startTimeoutMs ?? 10_000} ms`, tail)), this.#options.startTimeoutMs ?? 10_000)
      let partial = ''
      const take = (chunk: Buffer): void => {
        const lines = (partial + chunk.toString()).split('\n')
        partial = lines.pop() ?? ''
        for (const line of lines) {
          if (line === '') continue
          tail.push(line)
          if (tail.length > TAIL_LINES) tail.shift()
          // DHCPDISCOVER/OFFER/REQUEST/ACK chatter is debug; anything else is rare and worth seeing.
          const ack = DHCPACK.exec(line)
          if (ack?.[1] !== undefined && ack[2] !== undefined) this.#leases.set(ack[1], ack[2].toLowerCase())
          if (/\bDHCP[A-Z]+\(/.test(line)) log?.debug({ dnsmasq: line }, 'dhcp')
          else if (/cannot|failed|error|illegal|bad /i.test(line)) log?.warn({ dnsmasq: line }, 'dhcp')
          else log?.info({ dnsmasq: line }, 'dhcp')
          if (ready) continue
          if (line.includes(`cannot read ${this.hostsFile}`)) fail(this.#error('it cannot read its hosts file', tail))
          else if (line.includes(`read ${this.hostsFile}`)) {
            ready = true
            clearTimeout(timer)
            resolve()
          }
        }
      }
      child.stdout?.on('data', take)
      child.stderr?.on('data', take)
      child.once('error', (err) => {
        fail(hasErrno(err, 'ENOENT')
          ? new UigniterError('UIG_ERR_NET_DHCP_FAILED', `the DHCP server for bridge ${this.#options.bridge} cannot start: ${program} is not installed (apt-get install dnsmasq-base); VMs that take their address from the kernel command line are not affected`, { cause: err })
          : this.#error(err.message, tail))
      })
      child.once('exit', (code, signal) => {
        if (!ready) fail(this.#error(`dnsmasq exited with ${signal ?? code} while starting`, tail))
        else this.#exited(child, code, signal, tail, Date.now() - startedAt)
      })
    })
    this.#state = 'running'
    this.#lastError = null
    log?.info({ pid: child.pid, bridge: this.#options.bridge }, 'DHCP server running')
    if (this.#reloadPending) {
      this.#reloadPending = false
      this.#reload()
    }
  }

  #exited (child: ChildProcess, code: number | null, signal: NodeJS.Signals | null, tail: string[], ranMs: number): void {
    if (this.#closed || this.#child !== child) return
    if (ranMs >= HEALTHY_RUN_MS) this.#failures = 0
    this.#failed(this.#error(`dnsmasq (pid ${child.pid ?? '?'}) died with ${signal ?? code}`, tail))
  }

  /** Logs a failure and schedules the next start, unless closed or hopeless. */
  #failed (err: unknown): void {
    const message = (err as Error).message
    this.#lastError = message
    this.#child = undefined
    if (this.#closed) return
    if (/is not installed/.test(message)) {
      this.#state = 'failed'
      this.#options.logger?.error({ err }, 'the DHCP server cannot run; unikernels that take their address by DHCP get none')
      return
    }
    const delay = Math.min(this.#backoff.maxMs, this.#backoff.initialMs * 2 ** this.#failures)
    this.#failures++
    this.#state = 'waiting'
    this.#options.logger?.error({ err, retryInMs: delay }, 'the DHCP server failed; restarting it after a backoff')
    this.#timer = setTimeout(() => {
      if (this.#closed) return
      this.#restarts++
      this.#run().catch((e: unknown) => { this.#failed(e) })
    }, delay)
    this.#timer.unref()
  }

  #error (what: string, tail: string[]): UigniterError {
    const output = tail.slice(-5).join('\n')
    const inUse = /Address already in use/.test(output)
      ? '; UDP port 67 is taken by another DHCP server listening on every interface (give it --bind-interfaces, or stop it)'
      : ''
    return new UigniterError('UIG_ERR_NET_DHCP_FAILED',
      `the DHCP server for bridge ${this.#options.bridge} (dnsmasq) failed: ${what}${inUse}; ` +
      `VMs that take their address from the kernel command line are not affected${output !== '' ? `. Its last output:\n${output}` : ''}`)
  }

  /** A dnsmasq of a crashed daemon on this bridge would answer beside ours: it goes first. */
  async #endLeftover (): Promise<void> {
    let pid: number
    try {
      pid = Number((await readFile(this.pidFile, 'utf8')).trim())
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) return
      throw err
    }
    if (!Number.isInteger(pid) || pid <= 1) return
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')
    // Only ours: the pid may have been reused by an unrelated process since.
    if (!cmdline.split('\0').includes(`--dhcp-hostsfile=${this.hostsFile}`)) return
    this.#options.logger?.warn({ pid }, 'ending the DHCP server a previous daemon left running')
    if (!signal(pid, 'SIGTERM')) return
    const deadline = Date.now() + 3000
    while (signal(pid, 0) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50))
    signal(pid, 'SIGKILL')
  }
}

/** process.kill that says whether the process was there (signal 0: only asks). */
function signal (pid: number, sig: NodeJS.Signals | 0): boolean {
  try {
    process.kill(pid, sig)
    return true
  } catch {
    return false
  }
}
