import { mkdir, readFile, rm, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { hasErrno, UigniterError } from '../../core/errors.js'
import { writeFileAtomic } from '../../core/fs-atomic.js'
import type { VmExit } from '../../core/vm.js'
import type { LaunchSpec } from './command-line.js'
import type { JailRecord } from './jail.js'

/** What launch.json holds: enough to find, check and describe the VM again after a daemon restart. */
export interface LaunchRecord {
  version: 1
  id: string
  /** The launch as the driver was asked for it, with the paths it chose. */
  spec: LaunchSpec
  cpuAffinity?: number[]
  qemuBinary: string
  argv: string[]
  createdAt: string
  /** The VM's jail: its uid, chroot and cgroup (found again from here after a restart). */
  jail?: JailRecord
}

/** sun_path holds 108 bytes with the NUL. */
const UNIX_PATH_MAX = 107

/**
 * The layout of one VM's state directory, `<dataDir>/vms/<id>/`:
 *
 * | file | written by | what |
 * |---|---|---|
 * | `launch.json` | driver, atomically | the launch spec and the exact argv |
 * | `qemu.pid` | QEMU (`-pidfile`) | QEMU's pid; QEMU removes it on a clean exit |
 * | `qmp.sock` | QEMU | the QMP monitor |
 * | `ctl.sock` | QEMU | the guest init's control channel |
 * | `console.log`, `console.log.1` | QEMU appends, driver rotates | the serial console |
 * | `qemu.log` | QEMU's stdout and stderr | QEMU's own messages |
 * | `overlay.img` | driver (mkfs.ext4) | the VM's writable overlay, if any |
 * | `exit.json` | driver | how the VM ended, once it has |
 * | `root/` | driver | a jailed QEMU's chroot: empty but for `mig.sock` while a template saves its state |
 * | `mig.sock` | driver | an unjailed template's migration socket, while it saves its state |
 */
export class VmStateDir {
  readonly dir: string

  constructor (dir: string) {
    // Normalized: it keys the driver's map and is matched in QEMU's command line.
    this.dir = resolve(dir)
  }

  /** The state directory of VM `id` under a data directory. */
  static of (dataDir: string, id: string): VmStateDir {
    return new VmStateDir(join(dataDir, 'vms', id))
  }

  get launchFile (): string { return join(this.dir, 'launch.json') }
  get pidFile (): string { return join(this.dir, 'qemu.pid') }
  get qmpSocket (): string { return join(this.dir, 'qmp.sock') }
  get controlSocket (): string { return join(this.dir, 'ctl.sock') }
  get consoleLog (): string { return join(this.dir, 'console.log') }
  get qemuLog (): string { return join(this.dir, 'qemu.log') }
  get overlayImage (): string { return join(this.dir, 'overlay.img') }
  get exitFile (): string { return join(this.dir, 'exit.json') }
  /** A jailed QEMU's chroot. */
  get rootDir (): string { return join(this.dir, 'root') }
  /** Where QEMU connects to send its migration stream, as the daemon sees it and as QEMU (chrooted or not) names it. */
  migrationSocket (jailed: boolean): { hostPath: string, qemuPath: string } {
    return jailed ? { hostPath: join(this.rootDir, 'mig.sock'), qemuPath: '/mig.sock' } : { hostPath: join(this.dir, 'mig.sock'), qemuPath: join(this.dir, 'mig.sock') }
  }

  /**
   * Creates the directory (private to root: sockets in it control the VM) and
   * removes what a previous run of the same VM left, so that markers and
   * exits found later belong to this run.
   */
  async prepare (): Promise<void> {
    if ([this.qmpSocket, this.controlSocket, this.migrationSocket(true).hostPath].some((p) => Buffer.byteLength(p) > UNIX_PATH_MAX)) {
      throw new UigniterError('UIG_ERR_VM_STATE_DIR', `the state directory ${this.dir} is too long for unix socket paths (${UNIX_PATH_MAX} bytes): use a shorter dataDir`)
    }
    await mkdir(this.dir, { recursive: true, mode: 0o700 })
    for (const file of [this.pidFile, this.qmpSocket, this.controlSocket, `${this.consoleLog}.1`, this.qemuLog, this.exitFile, this.overlayImage, this.migrationSocket(false).hostPath]) {
      await rm(file, { force: true })
    }
    await writeFile(this.consoleLog, '')
  }

  async writeLaunch (record: LaunchRecord): Promise<void> {
    await writeFileAtomic(this.launchFile, JSON.stringify(record, null, 2) + '\n')
  }

  async readLaunch (): Promise<LaunchRecord> {
    let text: string
    try {
      text = await readFile(this.launchFile, 'utf8')
    } catch (err) {
      throw new UigniterError('UIG_ERR_VM_STATE_DIR', `cannot read ${this.launchFile}: ${(err as Error).message}`, { cause: err })
    }
    try {
      const record = JSON.parse(text) as LaunchRecord
      if (record.version !== 1 || typeof record.id !== 'string' || !Array.isArray(record.argv)) throw new Error('unexpected content')
      return record
    } catch (err) {
      throw new UigniterError('UIG_ERR_VM_STATE_DIR', `${this.launchFile} is damaged: ${(err as Error).message}`, { cause: err })
    }
  }

  /** QEMU's pid from its pidfile, or undefined when there is none (QEMU removes it when it exits cleanly). */
  async readPid (): Promise<number | undefined> {
    try {
      const pid = Number((await readFile(this.pidFile, 'utf8')).trim())
      return Number.isInteger(pid) && pid > 0 ? pid : undefined
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) return undefined
      throw err
    }
  }

  async writeExit (exit: VmExit): Promise<void> {
    await writeFileAtomic(this.exitFile, JSON.stringify(exit) + '\n')
  }

  async readExit (): Promise<VmExit | undefined> {
    try {
      return JSON.parse(await readFile(this.exitFile, 'utf8')) as VmExit
    } catch {
      return undefined
    }
  }

  /** The last `bytes` of QEMU's own output, for error messages. */
  async qemuLogTail (bytes = 2048): Promise<string> {
    try {
      const text = await readFile(this.qemuLog, 'utf8')
      return text.slice(-bytes).trim()
    } catch {
      return ''
    }
  }

  /** Deletes everything, the overlay disk included. */
  async remove (): Promise<void> {
    await rm(this.dir, { recursive: true, force: true })
  }
}
