import { writeFileSync } from 'node:fs'
import { mkdir, readFile, rmdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { UigniterError, hasErrno } from '../../core/errors.js'

/** The controllers a VM's cgroup limits. */
const CONTROLLERS = ['cpu', 'cpuset', 'memory', 'pids'] as const
type Controller = typeof CONTROLLERS[number]

/** Where the host mounts its cgroups: one v1 hierarchy per controller, or the v2 unified tree. */
export type CgroupLayout =
  | { version: 1, mounts: Record<Controller, string> }
  | { version: 2, root: string }

/** What a VM's cgroup is held to. */
export interface CgroupLimits {
  /** CPU time, in CPUs: the VM's vCPUs (CFS quota over a 100 ms period). */
  cpus: number
  /** Host CPUs the VM may run on; the parent's (the host's) when absent. */
  cpuset?: number[]
  memoryBytes: number
  pidsMax: number
}

/** What launch.json records of a VM's cgroup, so that a restarted daemon finds it again. */
export interface CgroupRecord {
  version: 1 | 2
  /** The VM's cgroup directories: one per controller on v1, one on v2. */
  dirs: string[]
}

/** Every uigniter VM's cgroup sits under this one, in each hierarchy. */
export const CGROUP_PARENT = 'uigniter'
const PERIOD_US = 100_000

/**
 * Finds the host's cgroup layout from /proc/self/mounts: v1 when every
 * controller we limit has its own v1 mount (as on this machine, fact 13,
 * where a `unified` v2 mount sits beside them with none of them), else v2
 * when the unified tree offers them all. Undefined when neither does.
 */
export async function detectCgroupLayout (mountsText?: string): Promise<CgroupLayout | undefined> {
  const text = mountsText ?? await readFile('/proc/self/mounts', 'utf8').catch(() => '')
  const v1: Partial<Record<Controller, string>> = {}
  let v2: string | undefined
  for (const line of text.split('\n')) {
    const [, where, type, options] = line.split(' ')
    if (where === undefined || options === undefined) continue
    if (type === 'cgroup') {
      const opts = options.split(',')
      for (const c of CONTROLLERS) if (opts.includes(c) && v1[c] === undefined) v1[c] = where
    } else if (type === 'cgroup2' && v2 === undefined) v2 = where
  }
  if (CONTROLLERS.every((c) => v1[c] !== undefined)) return { version: 1, mounts: v1 as Record<Controller, string> }
  if (v2 !== undefined) {
    const available = (await readFile(join(v2, 'cgroup.controllers'), 'utf8').catch(() => '')).trim().split(/\s+/)
    if (CONTROLLERS.every((c) => available.includes(c))) return { version: 2, root: v2 }
  }
  return undefined
}

/**
 * One VM's cgroup: CPU quota, cpuset, memory limit and pids limit, on v1 or
 * v2. The driver moves QEMU into it as spawn() returns (joinSync), before
 * QEMU's main() allocates anything, so that the guest's pages are charged
 * here and the kernel's OOM killer, when the limit is hit, picks QEMU alone.
 */
export class VmCgroup {
  readonly record: CgroupRecord

  private constructor (record: CgroupRecord) {
    this.record = record
  }

  /** The cgroup of a record read back from launch.json. */
  static of (record: CgroupRecord): VmCgroup {
    return new VmCgroup(record)
  }

  /**
   * Creates `uigniter/<name>` in each hierarchy and sets its limits. An
   * existing one (a crashed earlier run of the same VM) is reused and its
   * limits rewritten. Throws UIG_ERR_JAIL_SETUP when the kernel refuses.
   */
  static async create (layout: CgroupLayout, name: string, limits: CgroupLimits): Promise<VmCgroup> {
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(name)) throw new UigniterError('UIG_ERR_JAIL_SETUP', `invalid cgroup name "${name}"`)
    const quota = Math.max(1000, Math.round(limits.cpus * PERIOD_US))
    const cpuset = limits.cpuset !== undefined ? [...new Set(limits.cpuset)].sort((a, b) => a - b).join(',') : undefined
    try {
      if (layout.version === 1) {
        const dir = (c: Controller): string => join(layout.mounts[c], CGROUP_PARENT, name)
        const parentCpuset = await inheritCpuset(layout.mounts.cpuset)
        const group = new VmCgroup({ version: 1, dirs: CONTROLLERS.map(dir) })
        // One hierarchy per controller: set them up side by side (a clone's start waits on this).
        await Promise.all([
          (async () => {
            await mkdir(dir('cpu'), { recursive: true })
            await writeFile(join(dir('cpu'), 'cpu.cfs_period_us'), String(PERIOD_US))
            await writeFile(join(dir('cpu'), 'cpu.cfs_quota_us'), String(quota))
          })(),
          (async () => {
            await mkdir(dir('cpuset'), { recursive: true })
            await writeFile(join(dir('cpuset'), 'cpuset.cpus'), cpuset ?? parentCpuset.cpus)
            await writeFile(join(dir('cpuset'), 'cpuset.mems'), parentCpuset.mems)
          })(),
          (async () => {
            await mkdir(dir('memory'), { recursive: true })
            // Lower the swap-inclusive limit first when it is below, or the kernel refuses memory.limit_in_bytes.
            const memsw = join(dir('memory'), 'memory.memsw.limit_in_bytes')
            await writeFile(join(dir('memory'), 'memory.limit_in_bytes'), String(limits.memoryBytes)).catch(async () => {
              await writeFile(memsw, String(limits.memoryBytes))
              await writeFile(join(dir('memory'), 'memory.limit_in_bytes'), String(limits.memoryBytes))
            })
            // No swap beyond the limit, so that the limit is what kills (absent without swap accounting).
            await writeFile(memsw, String(limits.memoryBytes)).catch(() => {})
          })(),
          (async () => {
            await mkdir(dir('pids'), { recursive: true })
            await writeFile(join(dir('pids'), 'pids.max'), String(limits.pidsMax))
          })()
        ])
        return group
      }
      const parent = join(layout.root, CGROUP_PARENT)
      await mkdir(parent, { recursive: true })
      // v2: a child sees a controller only when every ancestor enables it for its subtree.
      for (const at of [layout.root, parent]) {
        await writeFile(join(at, 'cgroup.subtree_control'), CONTROLLERS.map((c) => `+${c}`).join(' '))
      }
      const dir = join(parent, name)
      await mkdir(dir, { recursive: true })
      const group = new VmCgroup({ version: 2, dirs: [dir] })
      await writeFile(join(dir, 'cpu.max'), `${quota} ${PERIOD_US}`)
      if (cpuset !== undefined) await writeFile(join(dir, 'cpuset.cpus'), cpuset)
      await writeFile(join(dir, 'memory.max'), String(limits.memoryBytes))
      await writeFile(join(dir, 'memory.swap.max'), '0').catch(() => {})
      await writeFile(join(dir, 'pids.max'), String(limits.pidsMax))
      return group
    } catch (err) {
      if (err instanceof UigniterError) throw err
      await new VmCgroup({ version: layout.version, dirs: layout.version === 1 ? CONTROLLERS.map((c) => join(layout.mounts[c], CGROUP_PARENT, name)) : [join(layout.root, CGROUP_PARENT, name)] }).remove().catch(() => {})
      throw new UigniterError('UIG_ERR_JAIL_SETUP', `cannot set up the cgroup ${CGROUP_PARENT}/${name}: ${(err as Error).message}`, { cause: err })
    }
  }

  /** The files a process writes its pid to, to join this cgroup in every hierarchy. */
  get procsFiles (): string[] {
    return this.record.dirs.map((d) => join(d, 'cgroup.procs'))
  }

  /**
   * Moves a process (and its threads) into the cgroup. Synchronous on
   * purpose: called right after spawn() returns, while QEMU is still being
   * loaded (libuv returns once exec succeeded; ld.so then maps QEMU's
   * hundred-odd libraries), before its main() allocates anything.
   */
  joinSync (pid: number): void {
    for (const file of this.procsFiles) writeFileSync(file, String(pid))
  }

  /** How many times the kernel's OOM killer killed a process of this cgroup (v1 memory.oom_control, v2 memory.events). */
  async oomKills (): Promise<number> {
    const file = this.record.version === 1 ? join(this.#dir('memory'), 'memory.oom_control') : join(this.#dir('memory'), 'memory.events')
    try {
      const m = /^oom_kill (\d+)$/m.exec(await readFile(file, 'utf8'))
      return m?.[1] !== undefined ? Number(m[1]) : 0
    } catch {
      return 0
    }
  }

  /** The limits as the kernel holds them, read back from the cgroup's files. */
  async readLimits (): Promise<{ cpuQuotaUs: number, cpuPeriodUs: number, cpuset: string, memoryBytes: number, pidsMax: number }> {
    const read = async (c: Controller, file: string): Promise<string> => (await readFile(join(this.#dir(c), file), 'utf8')).trim()
    if (this.record.version === 1) {
      return {
        cpuQuotaUs: Number(await read('cpu', 'cpu.cfs_quota_us')),
        cpuPeriodUs: Number(await read('cpu', 'cpu.cfs_period_us')),
        cpuset: await read('cpuset', 'cpuset.cpus'),
        memoryBytes: Number(await read('memory', 'memory.limit_in_bytes')),
        pidsMax: Number(await read('pids', 'pids.max'))
      }
    }
    const [quota, period] = (await read('cpu', 'cpu.max')).split(' ')
    return {
      cpuQuotaUs: Number(quota),
      cpuPeriodUs: Number(period),
      cpuset: await read('cpuset', 'cpuset.cpus.effective'),
      memoryBytes: Number(await read('memory', 'memory.max')),
      pidsMax: Number(await read('pids', 'pids.max'))
    }
  }

  /** The most memory the cgroup was ever charged (v1 memory.max_usage_in_bytes, v2 memory.peak); undefined where the kernel lacks it. */
  async peakMemoryBytes (): Promise<number | undefined> {
    const file = this.record.version === 1 ? 'memory.max_usage_in_bytes' : 'memory.peak'
    const text = await readFile(join(this.#dir('memory'), file), 'utf8').catch(() => undefined)
    return text === undefined ? undefined : Number(text.trim())
  }

  /** The pids in the cgroup (its memory hierarchy's view). */
  async pids (): Promise<number[]> {
    const text = await readFile(join(this.#dir('memory'), 'cgroup.procs'), 'utf8').catch(() => '')
    return text.split('\n').filter((l) => l !== '').map(Number)
  }

  /**
   * Removes the cgroup once its processes are gone; no-op when it is gone
   * already. A process that just exited may hold it a moment (EBUSY).
   */
  async remove (): Promise<void> {
    for (const dir of this.record.dirs) {
      for (let attempt = 0; ; attempt++) {
        try {
          await rmdir(dir)
          break
        } catch (err) {
          if (hasErrno(err, 'ENOENT')) break
          if (!hasErrno(err, 'EBUSY') || attempt >= 50) throw new UigniterError('UIG_ERR_JAIL_SETUP', `cannot remove the cgroup ${dir}: ${(err as Error).message}`, { cause: err })
          await sleep(20)
        }
      }
    }
  }

  #dir (c: Controller): string {
    if (this.record.version === 2) return this.record.dirs[0] ?? ''
    return this.record.dirs[CONTROLLERS.indexOf(c)] ?? ''
  }
}

/**
 * v1 creates a cpuset cgroup with no CPUs and no memory nodes; `uigniter/`
 * takes the root's, so that its children can. Resolves with what a child
 * inherits: the CPUs and memory nodes of `uigniter/`.
 */
async function inheritCpuset (mount: string): Promise<{ cpus: string, mems: string }> {
  const parent = join(mount, CGROUP_PARENT)
  await mkdir(parent, { recursive: true })
  const out = { cpus: '', mems: '' }
  for (const key of ['cpus', 'mems'] as const) {
    const file = `cpuset.${key}`
    out[key] = (await readFile(join(parent, file), 'utf8')).trim()
    if (out[key] === '') {
      out[key] = (await readFile(join(mount, file), 'utf8')).trim()
      await writeFile(join(parent, file), out[key])
    }
  }
  return out
}
