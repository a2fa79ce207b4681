import { spawn } from 'node:child_process'
import { closeSync, openSync } from 'node:fs'
import { open, stat } from 'node:fs/promises'
import { uptime } from 'node:os'
import { pino } from 'pino'
import { UigniterError, hasErrno, rethrowNoSpace } from '../../core/errors.js'
import { run } from '../../core/exec.js'
import type { Logger } from '../../core/logger.js'
import type { DriverCapabilities, GuestLaunch, SpawnOptions, VmmDriver } from '../../core/ports/vmm-driver.js'
import type { VmExit } from '../../core/vm.js'
import { QEMU_BINARY } from './qemu-binary.js'
import { buildQemuArgs, type LaunchSpec } from './command-line.js'
import { ConsoleFacts } from './console-facts.js'
import { ConsoleLog, DEFAULT_CONSOLE_LIMIT } from './console-log.js'
import { decideExit } from './exit-reason.js'
import { checkHostResources } from './host-resources.js'
import { HostProcess } from './host-process.js'
import { VmCgroup } from './cgroup.js'
import { Jailer, type JailOptions, type JailRecord } from './jail.js'
import { findOomKill } from './oom-kill.js'
import { QmpClient } from './qmp-client.js'
import { DEFAULT_STOP_TIMEOUTS, QemuVm, type StopTimeouts } from './qemu-vm.js'
import { PeriodicSweep } from './periodic-sweep.js'
import { VmStateDir, type LaunchRecord } from './vm-state-dir.js'

export interface QemuDriverOptions {
  log?: Logger
  qemuBinary?: string
  /** console.log is rotated past this size (default 1 MiB). */
  consoleLimitBytes?: number
  /**
   * How often every console is read and its size checked, as a backstop to
   * the file watch that does both on each write (default 30 s).
   */
  rotateIntervalMs?: number
  /** How often an adopted QEMU's pid is checked, as a backstop to QMP closing (default 10 s; a child's exit needs no check). */
  livenessPollMs?: number
  /** How long QEMU may take to open its monitor (default 10 s). */
  startTimeoutMs?: number
  stopTimeouts?: Partial<StopTimeouts>
  /** Jail every QEMU (docs/jail.md): own uid, chroot, seccomp, cgroup. Needs root. Unjailed when absent. */
  jail?: JailOptions
}

/**
 * Starts QEMU guests detached from the daemon (own session, output to
 * files, not waited on), so that they outlive it, and finds them again from
 * their state directories after a restart. Each VM's state directory holds
 * everything needed for that (see VmStateDir).
 *
 * @example
 * const driver = new QemuDriver({ log })
 * const vm = await driver.spawn({ id, stateDir: VmStateDir.of(dataDir, id).dir, launch })
 * const exit = await vm.stop({ graceMs: 5000 }) // { reason: 'stopped', appExitCode: 0, ... }
 */
export class QemuDriver implements VmmDriver<QemuVm> {
  readonly #log: Logger
  readonly #qemu: string
  readonly #consoleLimit: number
  readonly #startTimeoutMs: number
  readonly #stopTimeouts: StopTimeouts
  /** Live VMs by state directory, so that console readers share their log's rotation lock. */
  readonly #vms = new Map<string, QemuVm>()
  readonly #jailer: Jailer | undefined
  /**
   * Two timers for every VM together, never one per VM: with a thousand
   * alive, per-VM intervals (two checks every 2 s and a console read every
   * 0.5 s each) kept the daemon 15 % of a core busy for a hundred idle clones.
   */
  readonly #consoleSweep: PeriodicSweep<QemuVm>
  readonly #livenessSweep: PeriodicSweep<QemuVm>

  constructor (options: QemuDriverOptions = {}) {
    this.#log = options.log ?? pino({ level: 'silent' })
    this.#qemu = options.qemuBinary ?? QEMU_BINARY
    this.#consoleLimit = options.consoleLimitBytes ?? DEFAULT_CONSOLE_LIMIT
    const warn = (what: string) => (err: unknown, vm: QemuVm): void => { this.#log.warn({ err, vm: vm.id }, what) }
    this.#consoleSweep = new PeriodicSweep(options.rotateIntervalMs ?? 30_000, async (vm) => { await vm.checkConsole() }, warn('checking the VM\'s console failed'))
    this.#livenessSweep = new PeriodicSweep(options.livenessPollMs ?? 10_000, async (vm) => { await vm.checkLiveness() }, warn('checking the VM\'s QEMU failed'))
    this.#startTimeoutMs = options.startTimeoutMs ?? 10_000
    this.#stopTimeouts = { ...DEFAULT_STOP_TIMEOUTS, ...options.stopTimeouts }
    if (options.jail !== undefined) {
      if (process.getuid?.() !== 0) throw new UigniterError('UIG_ERR_JAIL_SETUP', 'the QEMU jail needs root (to chroot and change uid); run as root or turn it off (jail.enabled: false)')
      this.#jailer = new Jailer(options.jail)
    }
  }

  /** Whether this driver jails its QEMUs. */
  get jailed (): boolean {
    return this.#jailer !== undefined
  }

  /** QEMU clones through templating (x-ignore-shared migration over a shared RAM file) and pauses vCPUs over QMP. */
  get capabilities (): DriverCapabilities {
    return { clone: true, pause: true, jailed: this.jailed }
  }

  /**
   * Validates the launch against the host, prepares the state directory
   * (overlay disk included), starts QEMU detached and connects to its
   * monitor. Resolves once QEMU runs, not when the app is up (see
   * QemuVm.waitForMarker). Throws UIG_ERR_VM_RESOURCES, UIG_ERR_VM_SHARE_INVALID,
   * UIG_ERR_VOLUME_NOT_FOUND, UIG_ERR_VOLUME_INVALID, UIG_ERR_VM_CMDLINE_INVALID
   * before anything starts, UIG_ERR_VM_BOOT_FAILED
   * with QEMU's own message when it refuses to start.
   */
  async spawn (options: SpawnOptions): Promise<QemuVm> {
    const { id, launch, cpuAffinity } = options
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(id)) throw new UigniterError('UIG_ERR_VM_STATE_DIR', `invalid VM id "${id}"`)
    checkHostResources({ vcpus: launch.vcpus, memoryMiB: launch.memoryMiB, cpuAffinity })
    for (const share of launch.shares ?? []) await checkShare(share.hostPath)
    for (const volume of launch.volumes ?? []) await checkVolume(volume.hostPath)
    const dir = new VmStateDir(options.stateDir)
    const jailer = this.#jailer
    const uid = jailer !== undefined ? await jailer.takeUid(dir.dir) : undefined
    let cgroup: VmCgroup | undefined
    // Until a QemuVm owns them, a failed start gives the uid and the cgroup back.
    const undoJail = async (): Promise<void> => {
      if (uid !== undefined) await jailer?.releaseUid(uid)
      if (jailer !== undefined) await Jailer.unmountProc(dir.rootDir).catch((err: unknown) => this.#log.warn({ err, vm: id }, 'cannot unmount the procfs of a VM that did not start'))
      await cgroup?.remove().catch((err: unknown) => this.#log.warn({ err, vm: id }, 'cannot remove the cgroup of a VM that did not start'))
    }
    let record: LaunchRecord
    let argv: string[]
    let child
    try {
      if (jailer !== undefined && uid !== undefined) {
        for (const share of launch.shares ?? []) await jailer.checkShare(share.hostPath, share.readOnly, uid)
      }
      const { overlaySizeMiB, ...rest } = launch
      const spec: LaunchSpec = {
        ...rest,
        name: id,
        console: { kind: 'log', path: dir.consoleLog },
        qmpSocket: dir.qmpSocket,
        pidFile: dir.pidFile,
        ...(launch.manifest.init !== null ? { controlSocket: dir.controlSocket } : {}),
        ...(overlaySizeMiB !== undefined ? { overlayPath: dir.overlayImage } : {}),
        ...(jailer !== undefined && uid !== undefined ? { jail: { uid, gid: jailer.options.gid, root: dir.rootDir } } : {})
      }
      // Before touching the disk: a bad command line must not leave an overlay behind.
      argv = buildQemuArgs(spec)
      if (await this.#running(dir)) throw new UigniterError('UIG_ERR_VM_INVALID_STATE', `a QEMU already runs from ${dir.dir}; stop it before starting the VM again`)
      await dir.prepare()
      if (overlaySizeMiB !== undefined) await createOverlay(dir.overlayImage, overlaySizeMiB)
      let jail: JailRecord | undefined
      if (jailer !== undefined && uid !== undefined) {
        const writableShares = (launch.shares ?? []).some((share) => !share.readOnly)
        const made = await jailer.prepare({ id, stateDir: dir.dir, uid, vcpus: launch.vcpus, memoryMiB: launch.memoryMiB, writableShares, ...(cpuAffinity !== undefined ? { cpuAffinity } : {}) })
        jail = made.record
        cgroup = made.cgroup
      }
      record = { version: 1, id, spec, ...(cpuAffinity !== undefined ? { cpuAffinity } : {}), qemuBinary: this.#qemu, argv, createdAt: new Date().toISOString(), ...(jail !== undefined ? { jail } : {}) }
      await dir.writeLaunch(record)

      const out = openSync(dir.qemuLog, 'a')
      const incoming = options.incomingState !== undefined ? openIncoming(options.incomingState) : undefined
      try {
        // detached: its own session, so that the daemon's terminal and signals do not reach it.
        child = spawn(this.#qemu, argv, { detached: true, stdio: ['ignore', out, out, ...(incoming !== undefined ? [incoming] : [])], cwd: dir.dir })
        // At once, before QEMU's main() runs (see VmCgroup.joinSync): every page it touches is charged there.
        if (cgroup !== undefined && child.pid !== undefined) {
          try {
            cgroup.joinSync(child.pid)
          } catch (err) {
            child.kill('SIGKILL')
            throw new UigniterError('UIG_ERR_JAIL_SETUP', `cannot move QEMU (pid ${child.pid}) into its cgroup: ${(err as Error).message}`, { cause: err })
          }
        }
      } finally {
        closeSync(out)
        if (incoming !== undefined) closeSync(incoming)
      }
    } catch (err) {
      await undoJail()
      throw err
    }
    const log = this.#log.child({ vm: id })
    child.unref()
    const childExit = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve, reject) => {
      child.once('exit', (code, signal) => resolve({ code, signal }))
      child.once('error', (err) => {
        reject(hasErrno(err, 'ENOENT')
          ? new UigniterError('UIG_ERR_HOST_MISSING_TOOL', `cannot start ${this.#qemu}: it is not installed; run "npm run setup" to install qemu-system-x86`, { cause: err })
          : err)
      })
    })
    childExit.catch(() => {})
    const pid = child.pid
    const startedAtBootUs = pid !== undefined ? await new HostProcess(pid).startedAtBootUs() : undefined

    const diedEarly = childExit.then(async (status) => {
      const why = status.signal !== null ? `was killed by ${status.signal}` : `exited with code ${status.code}`
      const tail = await dir.qemuLogTail(1500)
      throw new UigniterError('UIG_ERR_VM_BOOT_FAILED', `QEMU ${why} as it started${tail !== '' ? `: ${tail.split('\n').slice(-4).join(' | ')}` : ''} (see ${dir.qemuLog})`)
    })
    // Once QMP answered, QEMU's end is the VM's business, not start()'s.
    diedEarly.catch(() => {})
    let qmp: QmpClient
    try {
      qmp = await Promise.race([QmpClient.connect(dir.qmpSocket, { timeoutMs: this.#startTimeoutMs }), diedEarly])
    } catch (err) {
      if (pid !== undefined) tryKill(pid)
      await childExit.catch(() => {})
      await undoJail()
      throw err
    }
    if (pid === undefined) {
      await undoJail()
      throw new UigniterError('UIG_ERR_VM_BOOT_FAILED', 'QEMU started without a pid')
    }
    // No await from here to the QemuVm: it must see QMP close if QEMU ends at once.
    const vm = new QemuVm({
      record,
      dir,
      pid,
      qmp,
      console: this.#consoleLog(dir),
      log,
      childExit,
      startedAtBootUs,
      stopTimeouts: this.#stopTimeouts,
      assumeBooted: restored(record),
      ...(cgroup !== undefined ? { cgroup } : {}),
      forget: () => { this.#forgetVm(dir, vm); if (uid !== undefined) void jailer?.releaseUid(uid) }
    })
    this.#track(dir, vm)
    log.info({ pid, argv, ...(record.jail !== undefined ? { jail: record.jail } : {}) }, 'QEMU started')
    try {
      // A clone must not announce the state it restores: QEMU would have the guest broadcast
      // gratuitous ARPs of its template's address and MAC (self-announce, five rounds over
      // about 1.5 s), each one flooded to every VM on the bridge, before and after the clone
      // took its own identity, which it announces itself (src/guest/init).
      if (launch.incoming === 'defer') await vm.monitor('migrate-set-parameters', { 'announce-rounds': 0 })
      if (cpuAffinity !== undefined) await vm.setCpuAffinity(cpuAffinity)
    } catch (err) {
      vm.kill()
      await vm.exited
      throw err
    }
    return vm
  }

  /**
   * Finds a VM again from its state directory after a daemon restart: the
   * pid from QEMU's pidfile, trusted only if /proc says it is a QEMU whose
   * arguments name this directory (a pid may have been recycled), then its
   * monitor. A VM that ended meanwhile comes back as `{ dead, exit }`, the
   * exit decided from its console and the host's kernel log.
   */
  async adopt (stateDir: string): Promise<QemuVm | { dead: true, exit: VmExit }> {
    const dir = new VmStateDir(stateDir)
    const record = await dir.readLaunch()
    const known = this.#vms.get(dir.dir)
    if (known !== undefined) return known
    const recorded = await dir.readExit()
    if (recorded !== undefined) return { dead: true, exit: recorded }
    const pid = await dir.readPid()
    const proc = pid !== undefined ? new HostProcess(pid) : undefined
    const consoleLog = this.#consoleLog(dir)
    // Rotated: the boot's markers may have been dropped, but so much output means the guest booted.
    const rotated = await stat(consoleLog.previousPath).then(() => true, () => false)
    const cgroup = record.jail?.cgroup !== undefined ? VmCgroup.of(record.jail.cgroup) : undefined
    const jailUid = record.jail?.uid
    if (proc !== undefined && await proc.alive() && await proc.isQemuOf(dir.dir)) {
      if (jailUid !== undefined) await this.#jailer?.holdUid(jailUid, dir.dir)
      try {
        const startedAtBootUs = await proc.startedAtBootUs()
        const qmp = await QmpClient.connect(dir.qmpSocket, { timeoutMs: 5000 })
        const vm = new QemuVm({
          record,
          dir,
          pid: proc.pid,
          qmp,
          console: consoleLog,
          log: this.#log.child({ vm: record.id }),
          startedAtBootUs,
          stopTimeouts: this.#stopTimeouts,
          assumeBooted: rotated || restored(record),
          ...(cgroup !== undefined ? { cgroup } : {}),
          forget: () => { this.#forgetVm(dir, vm); if (jailUid !== undefined) void this.#jailer?.releaseUid(jailUid) }
        })
        this.#track(dir, vm)
        // The log may have grown past its bound while no daemon watched it.
        await consoleLog.rotateIfNeeded()
        this.#log.info({ vm: record.id, pid: proc.pid }, 'adopted a running QEMU')
        return vm
      } catch (err) {
        if (jailUid !== undefined) await this.#jailer?.releaseUid(jailUid)
        // It may have ended while we looked; otherwise its monitor is unusable.
        if (await proc.alive()) throw err
      }
    }
    const facts = new ConsoleFacts()
    facts.feed(await consoleLog.read({ tailBytes: Infinity }))
    facts.end()
    if (rotated || restored(record)) facts.init = true
    const exit = decideExit({
      pid: pid ?? 0,
      console: facts,
      oomKill: pid !== undefined ? await findOomKill(pid, bootUsOf(record.createdAt)) : undefined,
      ...(cgroup !== undefined && await cgroup.oomKills() > 0 ? { memoryLimitKill: { limitMiB: record.jail?.memoryLimitMiB ?? 0, memoryMiB: record.spec.memoryMiB } } : {}),
      foundDead: true,
      qemuLogTail: await dir.qemuLogTail()
    })
    await dir.writeExit(exit).catch(() => {})
    await cgroup?.remove().catch((err: unknown) => this.#log.warn({ err, vm: record.id }, 'cannot remove the cgroup of a VM that ended while the daemon was down'))
    if (record.jail !== undefined && this.#jailer !== undefined) {
      // Its uid's lock, if it is still this VM's, goes with it.
      await this.#jailer.holdUid(record.jail.uid, dir.dir).then(async () => { if (record.jail !== undefined) await this.#jailer?.releaseUid(record.jail.uid) }).catch(() => {})
    }
    if (record.jail?.proc === true) await Jailer.unmountProc(dir.rootDir).catch((err: unknown) => this.#log.warn({ err, vm: record.id }, 'cannot unmount the jail\'s procfs'))
    this.#log.info({ vm: record.id, exit }, 'the VM ended while the daemon was down')
    return { dead: true, exit }
  }

  /** The launch a VM was spawned with (launch.json), running or not. */
  async launchOf (stateDir: string): Promise<GuestLaunch> {
    return (await new VmStateDir(stateDir).readLaunch()).spec
  }

  /** The last `tailBytes` (default 64 KiB) of a VM's console, running or not. */
  async readConsole (stateDir: string, options: { tailBytes?: number } = {}): Promise<string> {
    const vm = this.#vms.get(new VmStateDir(stateDir).dir)
    if (vm !== undefined) return await vm.readConsole(options)
    return await new ConsoleLog(new VmStateDir(stateDir).consoleLog).read(options)
  }

  /**
   * Follows a VM's console (tail -f across rotations) after its last
   * `tailBytes` (default none). For a running VM it ends by itself when the
   * VM ends (`onEnd`); for an ended one, after what is there.
   */
  followConsole (stateDir: string, onData: (text: string) => void, options: { tailBytes?: number, onEnd?: () => void } = {}): () => void {
    const vm = this.#vms.get(new VmStateDir(stateDir).dir)
    if (vm !== undefined) return vm.followConsole(onData, options)
    const log = new ConsoleLog(new VmStateDir(stateDir).consoleLog)
    const stop = log.follow(onData, { tailBytes: options.tailBytes ?? 0 })
    void log.poll().finally(() => { stop(); log.close(); options.onEnd?.() })
    return stop
  }

  /**
   * Deletes a VM's state directory, its overlay disk included. Refuses while
   * its QEMU runs (UIG_ERR_VM_INVALID_STATE): stop or kill it first.
   */
  async remove (stateDir: string): Promise<void> {
    const dir = new VmStateDir(stateDir)
    if (await this.#running(dir)) {
      throw new UigniterError('UIG_ERR_VM_INVALID_STATE', `the VM in ${dir.dir} is still running; stop or kill it first`)
    }
    // Never delete through a mounted procfs.
    await Jailer.unmountProc(dir.rootDir)
    await dir.remove()
  }

  /**
   * A live VM's console: followed through a file watch; its own backstop
   * timer is off (its interval is the longest a timer takes), the driver's
   * console sweep reads it instead.
   */
  #consoleLog (dir: VmStateDir): ConsoleLog {
    return new ConsoleLog(dir.consoleLog, { limitBytes: this.#consoleLimit, rotate: true, pollMs: MAX_TIMER_MS })
  }

  #track (dir: VmStateDir, vm: QemuVm): void {
    this.#vms.set(dir.dir, vm)
    this.#consoleSweep.add(vm)
    if (vm.needsLivenessCheck) this.#livenessSweep.add(vm)
  }

  #forgetVm (dir: VmStateDir, vm: QemuVm): void {
    if (this.#vms.get(dir.dir) === vm) this.#vms.delete(dir.dir)
    this.#consoleSweep.delete(vm)
    this.#livenessSweep.delete(vm)
  }

  /** True while a QEMU of this state directory runs, known to this driver or not. */
  async #running (dir: VmStateDir): Promise<boolean> {
    if (this.#vms.has(dir.dir)) return true
    const pid = await dir.readPid().catch(() => undefined)
    if (pid === undefined) return false
    const proc = new HostProcess(pid)
    return await proc.alive() && await proc.isQemuOf(dir.dir)
  }
}

/** A sparse file with an ext4 file system: only what the guest writes takes host disk. */
async function createOverlay (path: string, sizeMiB: number): Promise<void> {
  try {
    const fh = await open(path, 'w', 0o600)
    try {
      await fh.truncate(sizeMiB * 1024 * 1024)
    } finally {
      await fh.close()
    }
  } catch (err) {
    rethrowNoSpace(err, path)
  }
  // No journal: the overlay lives and dies with one VM, so there is nothing to recover after a crash.
  await run('mkfs.ext4', ['-q', '-F', '-m', '0', '-O', '^has_journal', '-L', 'uigniter-ovl', path], {
    onFail: (r) => new UigniterError('UIG_ERR_VM_BOOT_FAILED', `mkfs.ext4 could not make the overlay ${path}: ${r.stderr.trim()}`)
  })
}

async function checkShare (hostPath: string): Promise<void> {
  try {
    if ((await stat(hostPath)).isDirectory()) return
  } catch (err) {
    throw new UigniterError('UIG_ERR_VM_SHARE_INVALID', `cannot share ${hostPath}: ${hasErrno(err, 'ENOENT') ? 'it does not exist' : (err as Error).message}`, { cause: err })
  }
  throw new UigniterError('UIG_ERR_VM_SHARE_INVALID', `cannot share ${hostPath}: it is not a directory`)
}

/**
 * A volume's disk must be there before QEMU starts: QEMU would refuse it with a
 * message about a drive, or, for a directory, fail in ways far from the cause.
 * No chown, even jailed: QEMU opens its -drive files as root, before it chroots
 * and takes the jail's uid (design.md fact 12).
 */
async function checkVolume (hostPath: string): Promise<void> {
  try {
    if ((await stat(hostPath)).isFile()) return
  } catch (err) {
    throw new UigniterError('UIG_ERR_VOLUME_NOT_FOUND', `cannot attach the volume file ${hostPath}: ${hasErrno(err, 'ENOENT') ? 'it does not exist' : (err as Error).message}`, { cause: err })
  }
  throw new UigniterError('UIG_ERR_VOLUME_NOT_FOUND', `cannot attach the volume file ${hostPath}: it is not a regular file`)
}

/** Node runs a timer of a longer delay at once (after 1 ms): this is the longest it keeps. */
const MAX_TIMER_MS = 2 ** 31 - 1

/** The state file for -incoming, read-only: QEMU reads it as fd 3 (see INCOMING_STATE_URI). */
function openIncoming (path: string): number {
  try {
    return openSync(path, 'r')
  } catch (err) {
    throw new UigniterError('UIG_ERR_VM_BOOT_FAILED', `cannot open the saved state ${path}: ${(err as Error).message}`, { cause: err })
  }
}

function tryKill (pid: number): void {
  try {
    process.kill(pid, 'SIGKILL')
  } catch { /* gone already */ }
}

/** A wall-clock time as µs since the host booted (the clock of /dev/kmsg); 0 if before this boot. */
function bootUsOf (iso: string): number {
  const bootMs = Date.now() - uptime() * 1000
  return Math.max(0, (Date.parse(iso) - bootMs) * 1000)
}

/** A clone resumes a guest that booted in its template: its console never shows the init's start. */
function restored (record: LaunchRecord): boolean {
  return record.spec.incoming !== undefined
}
