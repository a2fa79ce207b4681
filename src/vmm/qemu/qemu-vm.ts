import { EventEmitter, once } from 'node:events'
import { createWriteStream } from 'node:fs'
import { chown, readFile, rm } from 'node:fs/promises'
import { createServer, type Socket } from 'node:net'
import { pipeline } from 'node:stream/promises'
import { UigniterError, hasErrno } from '../../core/errors.js'
import { run } from '../../core/exec.js'
import type { Logger } from '../../core/logger.js'
import type { GuestVm } from '../../core/ports/vmm-driver.js'
import type { VmExit } from '../../core/vm.js'
import { ConsoleFacts } from './console-facts.js'
import type { ConsoleLog } from './console-log.js'
import type { ConsoleMarker } from './console-markers.js'
import { ControlChannel } from './control-channel.js'
import { decideExit, type ExitEvidence } from './exit-reason.js'
import type { VmCgroup } from './cgroup.js'
import { checkHostResources } from './host-resources.js'
import { Jailer } from './jail.js'
import { HostProcess } from './host-process.js'
import { findOomKill } from './oom-kill.js'
import { restoreState, saveState, type MigrationSink } from './qemu-migration.js'
import type { QmpClient, QmpEvent, QmpStatus } from './qmp-client.js'
import type { LaunchRecord, VmStateDir } from './vm-state-dir.js'

/** How long each step of a stop may take before the next, harsher one. */
export interface StopTimeouts {
  /** Past the grace period, for the init to report the app's end and reboot. */
  guestMarginMs: number
  /** After QMP `quit`. */
  quitMs: number
  /** After SIGTERM to QEMU. */
  termMs: number
  /** After SIGKILL; a QEMU still there then is stuck in the kernel. */
  killMs: number
}

export const DEFAULT_STOP_TIMEOUTS: StopTimeouts = { guestMarginMs: 3000, quitMs: 3000, termMs: 3000, killMs: 5000 }

/** What the driver hands a QemuVm; internal to the driver. */
export interface QemuVmInit {
  record: LaunchRecord
  dir: VmStateDir
  pid: number
  qmp: QmpClient
  console: ConsoleLog
  log: Logger
  /** The exit status of a QEMU this process spawned; undefined for an adopted one. */
  childExit?: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
  startedAtBootUs?: number
  stopTimeouts: StopTimeouts
  /**
   * The guest booted before this console was read: the log was rotated, or
   * the VM is a clone restored from a template's snapshot.
   */
  assumeBooted?: boolean
  /** The jailed QEMU's cgroup: read for an OOM kill and removed when the VM ends. */
  cgroup?: VmCgroup
  /** Called once when the VM ends or is closed: the driver forgets it. */
  forget?: () => void
}

type Requested = NonNullable<ExitEvidence['requested']>

/**
 * One running QEMU, started by this daemon or adopted from its state
 * directory after a restart. `exited` settles once, with how the VM ended
 * (the app's status when the init reported it, else why QEMU ended). Events:
 * 'marker' (ConsoleMarker, from the init), 'event' (QmpEvent), 'exit' (VmExit).
 */
export class QemuVm extends EventEmitter implements GuestVm {
  readonly id: string
  readonly pid: number
  readonly stateDir: string
  readonly exited: Promise<VmExit>
  readonly #record: LaunchRecord
  readonly #dir: VmStateDir
  readonly #qmp: QmpClient
  readonly #console: ConsoleLog
  readonly #log: Logger
  readonly #timeouts: StopTimeouts
  readonly #facts = new ConsoleFacts()
  readonly #seen = new Map<ConsoleMarker['kind'], ConsoleMarker>()
  readonly #startedAtBootUs: number | undefined
  readonly #unfollow: () => void
  readonly #followers = new Set<{ stop: () => void, onEnd?: () => void }>()
  readonly #forget: (() => void) | undefined
  readonly #childExit: Promise<unknown> | undefined
  readonly #cgroup: VmCgroup | undefined
  #resolveExit!: (exit: VmExit) => void
  #shutdown: { reason: string, guest: boolean } | undefined
  #status: { code: number | null, signal: string | null } | undefined
  #requested: Requested | undefined
  #stopping: Promise<VmExit> | undefined
  #gone = false
  #ended: VmExit | undefined
  #closed = false

  constructor (init: QemuVmInit) {
    super()
    this.id = init.record.id
    this.pid = init.pid
    this.stateDir = init.dir.dir
    this.#record = init.record
    this.#dir = init.dir
    this.#qmp = init.qmp
    this.#console = init.console
    this.#log = init.log
    this.#timeouts = init.stopTimeouts
    this.#startedAtBootUs = init.startedAtBootUs
    this.#forget = init.forget
    this.#cgroup = init.cgroup
    if (init.assumeBooted === true) this.#facts.init = true
    this.exited = new Promise((resolve) => { this.#resolveExit = resolve })

    this.#qmp.on('event', (e: QmpEvent) => {
      if (e.event === 'SHUTDOWN') this.#shutdown = { reason: typeof e.data.reason === 'string' ? e.data.reason : 'none', guest: e.data.guest === true }
      this.emit('event', e)
    })
    // The fast path: QEMU closes the monitor as it exits.
    this.#qmp.on('close', () => { void this.#pollUntilGone(25, 10_000) })
    if (this.#qmp.closed) void this.#pollUntilGone(25, 10_000)
    this.#childExit = init.childExit
    init.childExit?.then((status) => {
      this.#status = status
      void this.#onGone()
    }).catch(() => {})
    // No timer of its own: the driver's sweep calls checkLiveness() and checkConsole() for every VM.
    // Every console byte, from the start: the markers tell how the app ended.
    this.#unfollow = this.#console.follow((text) => {
      for (const m of this.#facts.feed(text)) this.#onMarker(m)
    }, { tailBytes: Infinity })
  }

  /**
   * The backstop for an end that sent no event: a QEMU that is not this
   * process's child (adopted after a restart) and whose monitor closed
   * without the process going (or never was ours to watch). A child's end
   * arrives as its exit status, any end closes the monitor; neither is
   * polled. True when it needs the check: the driver sweeps only those.
   */
  get needsLivenessCheck (): boolean {
    return this.#childExit === undefined && !this.#gone && !this.#closed
  }

  async checkLiveness (): Promise<void> {
    if (this.needsLivenessCheck && !(await new HostProcess(this.pid).alive())) await this.#onGone()
  }

  /**
   * The backstop for the console's file watch (which wakes the followers
   * and rotates the log on each write): reads what a missed change left, and
   * rotates the log when it grew past its bound.
   */
  async checkConsole (): Promise<void> {
    if (this.#gone || this.#closed) return
    await this.#console.poll()
    await this.#console.rotateIfNeeded()
  }

  /** QEMU's command line and the launch it came from, as recorded in launch.json. */
  get launch (): LaunchRecord {
    return this.#record
  }

  /**
   * Stops the VM: the guest init sends the app SIGTERM and SIGKILL after
   * `graceMs` (default 10 s); if the guest has not ended shortly after that,
   * QMP `quit`; then SIGTERM and SIGKILL to QEMU, each with a deadline.
   * Idempotent: later calls (and calls after the end) get the same exit.
   */
  async stop (options: { graceMs?: number } = {}): Promise<VmExit> {
    if (this.#ended !== undefined) return this.#ended
    if (this.#closed) throw new UigniterError('UIG_ERR_VM_INVALID_STATE', `VM ${this.id} was let go (close()); adopt it again to stop it`)
    // Already ending on its own: that end is the answer, not a stop.
    if (this.#gone) return await this.exited
    this.#stopping ??= this.#stop(options.graceMs ?? 10_000)
    return await this.#stopping
  }

  /** SIGKILL to QEMU at once; `exited` then says `killed`. Idempotent. */
  kill (): void {
    if (this.#gone || this.#closed) return
    this.#requested = { kind: 'kill' }
    this.#signal('SIGKILL')
  }

  /** The jailed QEMU's cgroup, when it has one. */
  get cgroup (): VmCgroup | undefined {
    return this.#cgroup
  }

  /**
   * Opens a unix socket for QMP `migrate` to send the VM's state to, and
   * writes what arrives to `path`. A jailed QEMU may not exec `cat`
   * (spawn=deny) and sees only its chroot, so the socket is made inside the
   * chroot and given to the VM's uid; QEMU 7.2's `fd:` migration would need
   * SCM_RIGHTS over QMP, which Node's sockets cannot send.
   */
  async openMigrationSink (path: string): Promise<MigrationSink> {
    const jail = this.#record.jail
    const socket = this.#dir.migrationSocket(jail !== undefined)
    await rm(socket.hostPath, { force: true })
    let resolveConn!: (s: Socket) => void
    const conn = new Promise<Socket>((resolve) => { resolveConn = resolve })
    const server = createServer((s) => { server.close(); resolveConn(s) })
    server.listen(socket.hostPath)
    await once(server, 'listening')
    if (jail !== undefined) await chown(socket.hostPath, jail.uid, jail.gid)
    const written = conn.then(async (s) => { await pipeline(s, createWriteStream(path, { mode: 0o600 })) })
    written.catch(() => {})
    return {
      uri: `unix:${socket.qemuPath}`,
      written,
      close: () => {
        server.close()
        void rm(socket.hostPath, { force: true })
      }
    }
  }

  /** The control channel's socket; undefined for a guest without our init. */
  get controlSocket (): string | undefined {
    return this.#record.spec.controlSocket
  }

  /** See GuestVm.saveState: a template's snapshot, waited on through QMP MIGRATION events. */
  async saveState (statePath: string, timeoutMs: number): Promise<void> {
    await saveState(this, statePath, timeoutMs)
  }

  /** See GuestVm.restoreState: a clone's restore, waited on through QMP MIGRATION events. */
  async restoreState (timeoutMs: number): Promise<void> {
    await restoreState(this, timeoutMs)
  }

  /** Pauses the vCPUs (QMP `stop`). */
  async pause (): Promise<void> {
    await this.#live('pause').stop()
  }

  /** Resumes the vCPUs (QMP `cont`). */
  async resume (): Promise<void> {
    await this.#live('resume').cont()
  }

  /**
   * Runs one QMP command on this VM's monitor, for callers that drive QEMU
   * beyond the lifecycle (templates and clones run migrations with it).
   */
  async monitor<T = unknown> (command: string, args?: Record<string, unknown>, options: { timeoutMs?: number } = {}): Promise<T> {
    return await this.#live(`run ${command} on`).execute<T>(command, args, options)
  }

  /** QEMU's run state (QMP `query-status`). */
  async status (): Promise<QmpStatus> {
    return await this.#live('query').queryStatus()
  }

  /**
   * Pins every QEMU thread (the vCPU threads that QMP `query-cpus-fast`
   * lists, the main loop and the I/O threads) to the given host CPUs, with
   * util-linux's `taskset`. Resolves with the vCPU threads' ids.
   */
  async setCpuAffinity (cpuList: number[]): Promise<{ vcpuThreads: number[] }> {
    const qmp = this.#live('set the CPU affinity of')
    checkHostResources({ vcpus: 1, memoryMiB: 1, cpuAffinity: cpuList })
    const list = [...new Set(cpuList)].sort((a, b) => a - b).join(',')
    const vcpuThreads = (await qmp.queryCpus()).map((c) => c['thread-id'])
    // -a: every thread that exists now; threads QEMU starts later inherit the main thread's mask.
    await run('taskset', ['-a', '-p', '-c', list, String(this.pid)], {
      onFail: (r) => new UigniterError('UIG_ERR_VM_RESOURCES', `taskset could not pin QEMU (pid ${this.pid}) to CPUs ${list}: ${r.stderr.trim()}`)
    })
    for (const tid of [this.pid, ...vcpuThreads]) {
      const allowed = await threadCpus(this.pid, tid)
      if (allowed !== undefined && allowed !== list) {
        await run('taskset', ['-p', '-c', list, String(tid)])
      }
    }
    this.#log.info({ cpus: list, vcpuThreads }, 'pinned QEMU\'s threads')
    return { vcpuThreads }
  }

  /** The last `tailBytes` (default 64 KiB) of the console, the rotated part included. */
  async readConsole (options: { tailBytes?: number } = {}): Promise<string> {
    return await this.#console.read(options)
  }

  /**
   * Calls `onData` with console output as QEMU writes it (tail -f, across
   * rotations), after the last `tailBytes` (default none). It ends when the
   * returned function is called or the VM ends (then `onEnd` is called).
   */
  followConsole (onData: (text: string) => void, options: { tailBytes?: number, onEnd?: () => void } = {}): () => void {
    const entry = { stop: this.#console.follow(onData, { tailBytes: options.tailBytes ?? 0 }), onEnd: options.onEnd }
    if (this.#ended !== undefined) {
      // Already over: what follow() reads is all there will be.
      void this.#console.poll().finally(() => { entry.stop(); entry.onEnd?.() })
      return entry.stop
    }
    this.#followers.add(entry)
    return () => { entry.stop(); this.#followers.delete(entry) }
  }

  /** Resolves with the marker once the init has printed it; rejects when the VM ends first or after `timeoutMs`. */
  async waitForMarker (kind: ConsoleMarker['kind'], timeoutMs: number): Promise<ConsoleMarker> {
    const seen = this.#seen.get(kind)
    if (seen !== undefined) return seen
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => { cleanup(); reject(new UigniterError('UIG_ERR_VM_TIMEOUT', `the guest did not report ${kind} within ${timeoutMs} ms`)) }, timeoutMs)
      const onMarker = (m: ConsoleMarker): void => { if (m.kind === kind) { cleanup(); resolve(m) } }
      const onExit = (exit: VmExit): void => {
        cleanup()
        reject(new UigniterError(exit.reason === 'exec-failed' ? 'UIG_ERR_VM_APP_NOT_STARTED' : 'UIG_ERR_VM_BOOT_FAILED', `the VM ended before ${kind}: ${exit.detail}`))
      }
      const cleanup = (): void => { clearTimeout(timer); this.off('marker', onMarker); this.off('exit', onExit) }
      this.on('marker', onMarker)
      this.on('exit', onExit)
    })
  }

  /**
   * Lets go of the VM without stopping it (daemon shutdown): closes the QMP
   * connection, timers and console readers. `exited` then never settles;
   * `QemuDriver.adopt()` finds the VM again.
   */
  close (): void {
    if (this.#closed) return
    this.#closed = true
    this.#release()
  }

  async #stop (graceMs: number): Promise<VmExit> {
    const req: Requested = { kind: 'stop', step: 'guest', graceMs }
    if (this.#requested === undefined) this.#requested = req
    const t = this.#timeouts
    if (this.#record.spec.controlSocket !== undefined) {
      // A paused guest cannot run its init's shutdown.
      try {
        // Short deadlines: a hung QEMU must not hold up the escalation.
        const { status } = await this.#qmp.execute<QmpStatus>('query-status', undefined, { timeoutMs: 1000 })
        if (status === 'paused') await this.#qmp.execute('cont', undefined, { timeoutMs: 1000 })
      } catch { /* QEMU may be ending already */ }
      void this.#askGuestToStop(graceMs, graceMs + t.guestMarginMs)
      if (await this.#endsWithin(graceMs + t.guestMarginMs)) return await this.exited
    }
    if (req.kind === 'stop') req.step = 'quit'
    this.#log.info({ graceMs }, 'the guest did not stop in time: QMP quit')
    void this.#qmp.quit().catch(() => {})
    if (await this.#endsWithin(t.quitMs)) return await this.exited
    if (req.kind === 'stop') req.step = 'sigterm'
    this.#log.warn('QEMU did not quit: SIGTERM')
    this.#signal('SIGTERM')
    if (await this.#endsWithin(t.termMs)) return await this.exited
    if (req.kind === 'stop') req.step = 'sigkill'
    this.#log.warn('QEMU ignored SIGTERM: SIGKILL')
    this.#signal('SIGKILL')
    if (await this.#endsWithin(t.killMs)) return await this.exited
    throw new UigniterError('UIG_ERR_VM_TIMEOUT', `QEMU (pid ${this.pid}) is still there ${t.killMs} ms after SIGKILL; it is stuck in the host kernel (check "cat /proc/${this.pid}/stack")`)
  }

  async #askGuestToStop (graceMs: number, deadlineMs: number): Promise<void> {
    const socket = this.#record.spec.controlSocket
    if (socket === undefined) return
    let channel: ControlChannel | undefined
    try {
      channel = await ControlChannel.connect(socket, Math.min(2000, deadlineMs))
      await channel.request('shutdown', { timeout_ms: graceMs }, deadlineMs)
    } catch (err) {
      this.#log.info({ err }, 'the guest init did not take the shutdown request')
    } finally {
      channel?.close()
    }
  }

  async #endsWithin (ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<false>((resolve) => { timer = setTimeout(() => resolve(false), ms) })
    try {
      return await Promise.race([this.exited.then(() => true), timeout])
    } finally {
      clearTimeout(timer)
    }
  }

  #signal (signal: NodeJS.Signals): void {
    try {
      process.kill(this.pid, signal)
    } catch (err) {
      if (!hasErrno(err, 'ESRCH')) throw err
    }
  }

  #live (what: string): QmpClient {
    if (this.#ended !== undefined || this.#gone || this.#closed || this.#qmp.closed) {
      throw new UigniterError('UIG_ERR_VM_INVALID_STATE', `cannot ${what} VM ${this.id}: its QEMU has ended${this.#ended !== undefined ? ` (${this.#ended.detail})` : ''}`)
    }
    return this.#qmp
  }

  #onMarker (m: ConsoleMarker): void {
    if (!this.#seen.has(m.kind)) this.#seen.set(m.kind, m)
    this.emit('marker', m)
  }

  async #pollUntilGone (intervalMs: number, forMs: number): Promise<void> {
    const until = Date.now() + forMs
    while (!this.#gone && !this.#closed && Date.now() < until) {
      if (!(await new HostProcess(this.pid).alive())) {
        await this.#onGone()
        return
      }
      await new Promise((resolve) => setTimeout(resolve, intervalMs))
    }
  }

  /** QEMU is gone: gather the last evidence, decide the exit once, and let go of everything. */
  async #onGone (): Promise<void> {
    if (this.#gone || this.#closed) return
    this.#gone = true
    try {
      // QEMU sends SHUTDOWN before it exits; let the socket deliver what is left.
      if (!this.#qmp.closed) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, 1000)
          this.#qmp.once('close', () => { clearTimeout(timer); resolve() })
        })
      }
      // A zombie counts as gone before Node has reaped it and reported its status.
      if (this.#childExit !== undefined && this.#status === undefined) {
        await Promise.race([this.#childExit.catch(() => {}), new Promise((resolve) => setTimeout(resolve, 1000))])
      }
      await this.#console.poll()
      for (const m of this.#facts.end()) this.#onMarker(m)
      const quiet = this.#shutdown === undefined && this.#facts.exit === undefined && this.#requested === undefined &&
        (this.#status === undefined || this.#status.signal === 'SIGKILL')
      const evidence: ExitEvidence = {
        pid: this.pid,
        requested: this.#requested,
        console: this.#facts,
        shutdown: this.#shutdown,
        status: this.#status,
        oomKill: quiet ? await findOomKill(this.pid, this.#startedAtBootUs) : undefined,
        ...(this.#cgroup !== undefined && await this.#cgroup.oomKills() > 0
          ? { memoryLimitKill: { limitMiB: this.#record.jail?.memoryLimitMiB ?? 0, memoryMiB: this.#record.spec.memoryMiB } }
          : {}),
        qemuLogTail: await this.#dir.qemuLogTail()
      }
      const exit = decideExit(evidence)
      this.#ended = exit
      await this.#dir.writeExit(exit).catch((err: unknown) => this.#log.warn({ err }, 'cannot record the exit in the state directory'))
      this.#log.info({ exit }, 'QEMU ended')
      await this.#releaseJail()
      this.#release()
      this.#resolveExit(exit)
      this.emit('exit', exit)
    } catch (err) {
      // Deciding must not leave `exited` pending: say what is known.
      const exit: VmExit = { reason: 'killed', detail: `QEMU (pid ${this.pid}) ended; its exit could not be examined: ${(err as Error).message}`, at: new Date().toISOString() }
      this.#ended = exit
      await this.#releaseJail().catch(() => {})
      this.#release()
      this.#resolveExit(exit)
      this.emit('exit', exit)
    }
  }

  /** A jailed QEMU cannot unlink its pidfile from inside its chroot, nor remove its cgroup: the daemon does both. */
  async #releaseJail (): Promise<void> {
    if (this.#record.jail === undefined) return
    await rm(this.#dir.pidFile, { force: true }).catch(() => {})
    await this.#cgroup?.remove().catch((err: unknown) => this.#log.warn({ err }, 'cannot remove the VM\'s cgroup'))
    if (this.#record.jail.proc === true) await Jailer.unmountProc(this.#record.jail.root).catch((err: unknown) => this.#log.warn({ err }, 'cannot unmount the jail\'s procfs'))
  }

  #release (): void {
    this.#unfollow()
    for (const f of this.#followers) {
      f.stop()
      f.onEnd?.()
    }
    this.#followers.clear()
    this.#console.close()
    this.#qmp.close()
    this.#forget?.()
  }
}

/** A thread's allowed CPUs as taskset would write them ("0,1"), from /proc. */
async function threadCpus (pid: number, tid: number): Promise<string | undefined> {
  try {
    const status = await readFile(`/proc/${pid}/task/${tid}/status`, 'utf8')
    const m = /^Cpus_allowed_list:\s*(\S+)/m.exec(status)
    if (m?.[1] === undefined) return undefined
    return expandCpuList(m[1]).join(',')
  } catch {
    return undefined
  }
}

/** "0-2,5" → [0, 1, 2, 5] */
function expandCpuList (text: string): number[] {
  const out: number[] = []
  for (const part of text.split(',')) {
    const [a, b] = part.split('-').map(Number)
    if (a === undefined || Number.isNaN(a)) continue
    for (let c = a; c <= (b ?? a); c++) out.push(c)
  }
  return out
}
