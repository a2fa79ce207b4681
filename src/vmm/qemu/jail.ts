import { createHash } from 'node:crypto'
import { chmod, mkdir, readFile, rm, stat, unlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { UigniterError, hasErrno } from '../../core/errors.js'
import { run } from '../../core/exec.js'
import { VmCgroup, detectCgroupLayout, type CgroupLayout, type CgroupRecord } from './cgroup.js'

/** How the driver jails each QEMU (config `jail`). */

/**
 * CPU quota beyond the vCPUs, for QEMU's own threads (main loop, device
 * emulation, I/O). Under TCG each vCPU thread alone can fill its CPU; with a
 * quota of exactly the vCPUs the device emulation was starved under load,
 * and the service tests' health checks and rolling updates failed.
 */
export const VMM_THREADS_CPUS = 1

export interface JailOptions {
  /** Each VM's QEMU runs as its own uid from [uidBase, uidBase + uidCount). */
  uidBase: number
  uidCount: number
  /** Every jailed QEMU's group: a share must be readable (writable) by it. */
  gid: number
  /** Added to the guest's RAM for the cgroup's memory limit: what QEMU itself needs (measured, see docs/jail.md). */
  memoryOverheadMiB: number
  pidsMax: number
  /** Per-VM cgroups (default true); without a usable cgroup layout the jail runs without them and says so. */
  cgroups?: boolean
  /** Where each taken uid has a lock file naming its VM's state directory, shared by every daemon on the host (default /run/uigniter/jail-uids). */
  lockDir?: string
}

export const DEFAULT_JAIL: JailOptions = { uidBase: 640_000, uidCount: 10_000, gid: 640_000, memoryOverheadMiB: 96, pidsMax: 256, cgroups: true }
/** A lock this young is taken even when its VM's QEMU is not found: that VM may be starting. */
const LOCK_GRACE_MS = 60_000

/** A VM's jail as launch.json records it. */
export interface JailRecord {
  uid: number
  gid: number
  /** The chroot: `<stateDir>/root`, empty and root-owned (QEMU 7.2 opens every path before it chroots, fact 12). */
  root: string
  cgroup?: CgroupRecord
  memoryLimitMiB?: number
  /** A procfs at `root/proc` (writable 9p shares only): see Jailer.prepare. */
  proc?: boolean
}

/**
 * QEMU's own jail (design.md fact 12): seccomp on with spawn (no exec:
 * migration, no helpers), obsolete and resource-control syscalls denied,
 * then `-runas uid:gid` (QEMU 7.2 takes a numeric uid:gid, so no passwd
 * entry is needed) and `-chroot`. QEMU opens its files, sockets and the tap
 * as root while it starts, before any guest code runs; then it chroots,
 * drops to the VM's uid (setuid clears every capability) and runs the guest.
 * elevateprivileges=deny is left out: with -runas it kills QEMU with SIGSYS.
 */
export function jailArgs (jail: { uid: number, gid: number, root: string }): string[] {
  if (!Number.isInteger(jail.uid) || !Number.isInteger(jail.gid) || jail.uid < 1 || jail.gid < 1) {
    throw new UigniterError('UIG_ERR_JAIL_SETUP', `a jailed QEMU needs a uid and gid above 0 (got ${jail.uid}:${jail.gid}): it must never run as root`)
  }
  return ['-sandbox', 'on,obsolete=deny,spawn=deny,resourcecontrol=deny', '-runas', `${jail.uid}:${jail.gid}`, '-chroot', jail.root]
}

/**
 * Allocates each VM's uid, makes its chroot and its cgroup, and releases
 * them when the VM ends. A uid is taken with a lock file (O_EXCL) that names
 * the VM's state directory, in a directory every daemon on the host shares:
 * two QEMUs never share a uid, so one escaped QEMU cannot signal, ptrace or
 * read another. A lock whose VM is gone (a daemon that crashed) is taken
 * over. A scan of /proc would do as well but costs milliseconds per start.
 */
export class Jailer {
  readonly options: Required<JailOptions>
  /** uid → the state directory of the VM that holds it. */
  readonly #held = new Map<number, string>()
  #layout: Promise<CgroupLayout | undefined> | undefined
  #lockDirMade: Promise<unknown> | undefined

  constructor (options: JailOptions) {
    if (options.uidBase < 1 || options.uidCount < 1 || options.gid < 1) throw new UigniterError('UIG_ERR_CONFIG_INVALID', 'jail.uidBase, jail.uidCount and jail.gid must be positive: a jailed QEMU never runs as root')
    this.options = { cgroups: true, lockDir: '/run/uigniter/jail-uids', ...options }
  }

  /** The host's cgroup layout, probed once; undefined when cgroups are off or unusable. */
  async layout (): Promise<CgroupLayout | undefined> {
    if (!this.options.cgroups) return undefined
    this.#layout ??= detectCgroupLayout()
    return await this.#layout
  }

  /** Takes a uid for the VM of `stateDir`: the first free one from a hash of the directory, so that restarts tend to give the same. */
  async takeUid (stateDir: string): Promise<number> {
    const { uidBase, uidCount } = this.options
    const start = Number.parseInt(createHash('sha256').update(stateDir).digest('hex').slice(0, 8), 16) % uidCount
    this.#lockDirMade ??= mkdir(this.options.lockDir, { recursive: true, mode: 0o700 })
    await this.#lockDirMade
    for (let i = 0; i < uidCount; i++) {
      const uid = uidBase + (start + i) % uidCount
      if (this.#held.has(uid)) continue
      if (await this.#lock(uid, stateDir)) {
        this.#held.set(uid, stateDir)
        return uid
      }
    }
    throw new UigniterError('UIG_ERR_JAIL_SETUP', `every jail uid from ${uidBase} to ${uidBase + uidCount - 1} is in use: raise jail.uidCount`)
  }

  /** Marks an adopted VM's uid as taken (its lock rewritten, in case it was lost). */
  async holdUid (uid: number, stateDir: string): Promise<void> {
    this.#held.set(uid, stateDir)
    await mkdir(this.options.lockDir, { recursive: true, mode: 0o700 })
    await writeFile(this.#lockPath(uid), stateDir)
  }

  /** Gives a uid back: its lock goes, if it is still this VM's. */
  async releaseUid (uid: number): Promise<void> {
    const stateDir = this.#held.get(uid)
    this.#held.delete(uid)
    if (stateDir === undefined) return
    const owner = await readFile(this.#lockPath(uid), 'utf8').catch(() => undefined)
    if (owner === stateDir) await unlink(this.#lockPath(uid)).catch(() => {})
  }

  #lockPath (uid: number): string {
    return join(this.options.lockDir, String(uid))
  }

  /** Takes uid's lock for stateDir: free, already this VM's, or left by a VM that is gone. */
  async #lock (uid: number, stateDir: string): Promise<boolean> {
    const path = this.#lockPath(uid)
    try {
      await writeFile(path, stateDir, { flag: 'wx', mode: 0o600 })
      return true
    } catch (err) {
      if (!hasErrno(err, 'EEXIST')) throw new UigniterError('UIG_ERR_JAIL_SETUP', `cannot take the jail uid lock ${path}: ${(err as Error).message}`, { cause: err })
    }
    const owner = await readFile(path, 'utf8').catch(() => '')
    if (owner !== stateDir && await lockAlive(path, owner, uid)) return false
    await writeFile(path, stateDir, { mode: 0o600 })
    return true
  }

  /**
   * Makes the chroot (empty, root-owned, mode 0755: QEMU can enter it and
   * write nothing there) and the cgroup. Names the cgroup by the VM id and a
   * hash of its state directory, so that VMs of two data directories with
   * the same id never meet.
   */
  async prepare (options: { id: string, stateDir: string, uid: number, vcpus: number, memoryMiB: number, cpuAffinity?: number[], writableShares?: boolean }): Promise<{ record: JailRecord, cgroup?: VmCgroup }> {
    const root = join(options.stateDir, 'root')
    if (await stat(join(root, 'proc')).then(() => true, () => false)) await Jailer.unmountProc(root)
    await rm(root, { recursive: true, force: true })
    await mkdir(root, { mode: 0o755 })
    await chmod(root, 0o755)
    let record: JailRecord = { uid: options.uid, gid: this.options.gid, root }
    if (options.writableShares === true) {
      // QEMU's 9p server sets a new file's mode (and xattrs) through /proc/self/fd/N, to stay off
      // symlinks: without a /proc in the chroot, creating a file or directory in a share fails
      // (ENOENT). This procfs shows the VM's uid its own process and nothing else:
      // hidepid=invisible hides other users' processes, subset=pid every non-process file.
      await mkdir(join(root, 'proc'), { mode: 0o555 })
      await run('mount', ['-t', 'proc', '-o', 'nosuid,nodev,noexec,hidepid=invisible,subset=pid', 'proc', join(root, 'proc')], {
        onFail: (r) => new UigniterError('UIG_ERR_JAIL_SETUP', `cannot mount a procfs in the jail ${root} for the VM's writable shares: ${r.stderr.trim()}`)
      })
      record = { ...record, proc: true }
    }
    const layout = await this.layout()
    if (layout === undefined) return { record }
    const memoryLimitMiB = options.memoryMiB + this.options.memoryOverheadMiB
    const name = `${options.id}-${createHash('sha256').update(options.stateDir).digest('hex').slice(0, 8)}`
    const cgroup = await VmCgroup.create(layout, name, {
      cpus: options.vcpus + VMM_THREADS_CPUS,
      ...(options.cpuAffinity !== undefined ? { cpuset: options.cpuAffinity } : {}),
      memoryBytes: memoryLimitMiB * 1024 * 1024,
      pidsMax: this.options.pidsMax
    })
    return { record: { ...record, cgroup: cgroup.record, memoryLimitMiB }, cgroup }
  }

  /** Unmounts a jail's procfs, if one is mounted (before its directory is deleted, or it is made again). */
  static async unmountProc (root: string): Promise<void> {
    const proc = join(root, 'proc')
    const mounts = await readFile('/proc/self/mounts', 'utf8').catch(() => '')
    if (!mounts.split('\n').some((l) => l.split(' ')[1] === proc)) return
    await run('umount', ['-l', proc], {
      onFail: (r) => new UigniterError('UIG_ERR_JAIL_SETUP', `cannot unmount the jail's procfs ${proc}: ${r.stderr.trim()}`)
    })
  }

  /**
   * A share is read (and written) by QEMU as the VM's uid and the jail's
   * group: refuses one that group cannot use, with what to do about it.
   */
  async checkShare (hostPath: string, readOnly: boolean, uid: number): Promise<void> {
    const s = await stat(hostPath)
    const shift = s.uid === uid ? 6 : s.gid === this.options.gid ? 3 : 0
    const bits = (s.mode >> shift) & 0o7
    const need = readOnly ? 0o5 : 0o7
    if ((bits & need) !== need) {
      throw new UigniterError('UIG_ERR_VM_SHARE_INVALID',
        `cannot share ${hostPath}: jailed QEMU reads it as uid ${uid} and group ${this.options.gid}, which may not ${readOnly ? 'read' : 'read and write'} it; ` +
        `give the group access (chgrp ${this.options.gid} ${hostPath} && chmod g+${readOnly ? 'rx' : 'rwx'} ${hostPath}) or turn the jail off (jail.enabled: false)`)
    }
  }
}

/** A lock is alive while it is young (its VM may be starting) or its VM's QEMU runs as its uid (/proc/PID belongs to the process's uid). */
async function lockAlive (path: string, owner: string, uid: number): Promise<boolean> {
  try {
    if (Date.now() - (await stat(path)).mtimeMs < LOCK_GRACE_MS) return true
    const pid = Number((await readFile(join(owner, 'qemu.pid'), 'utf8')).trim())
    return Number.isInteger(pid) && pid > 0 && (await stat(`/proc/${pid}`)).uid === uid
  } catch {
    return false
  }
}

/**
 * Whether to jail, from the config's `jail.enabled`: `auto` jails when the
 * daemon runs as root with bridge networking, and a user-mode (non-root)
 * run stays unjailed; `true` without root is refused (UIG_ERR_JAIL_SETUP).
 */
export function chooseJail (config: { enabled: 'auto' | boolean } & JailOptions, host: { root: boolean, bridge: boolean }): { jail?: JailOptions, reason: string } {
  const { enabled, ...options } = config
  if (enabled === false) return { reason: 'jail.enabled is false: QEMU runs as root, unconfined' }
  if (!host.root) {
    if (enabled === true) throw new UigniterError('UIG_ERR_JAIL_SETUP', 'jail.enabled is true, but the QEMU jail needs root (to chroot and change uid); run as root or set jail.enabled to "auto" or false')
    return { reason: 'not root: QEMU runs unjailed, as the daemon\'s own user (the jail needs root)' }
  }
  if (enabled === 'auto' && !host.bridge) return { reason: 'user-mode networking: QEMU runs unjailed (jail.enabled "auto" jails with bridge networking; set it to true to jail anyway)' }
  return { jail: options, reason: `each QEMU runs as its own uid from ${options.uidBase}, chrooted, with seccomp and its own cgroup` }
}
