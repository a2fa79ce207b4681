import { access, constants } from 'node:fs/promises'
import { availableParallelism } from 'node:os'
import { run } from '../../src/core/exec.js'

/**
 * Which CPUs the load generator and the servers it loads get. On a small
 * machine (2 cores here) a generator sharing a core with the proxy takes CPU
 * from what it measures; apart, each has a core of its own.
 */
export interface CpuPlan {
  /** taskset lists, e.g. "0" and "1". */
  generator: string
  servers: string
  /** One sentence for the report. */
  note: string
}

const TASKSET = '/usr/bin/taskset'

/** The generator on CPU 0, the servers on the others; undefined (and why) without taskset or a second CPU. */
export async function planCpus (): Promise<{ plan?: CpuPlan, why?: string }> {
  const n = availableParallelism()
  if (n < 2) return { why: `not pinned: ${n} CPU` }
  const has = await access(TASKSET, constants.X_OK).then(() => true, () => false)
  if (!has) return { why: 'not pinned: taskset is missing (apt-get install util-linux)' }
  const servers = n === 2 ? '1' : `1-${n - 1}`
  return { plan: { generator: '0', servers, note: `wrk pinned to CPU 0, the proxy and upstream processes to CPU ${servers} (taskset)` } }
}

/** Pins every thread of each process (taskset -a -p) to `cpus`. */
export async function pinProcesses (pids: number[], cpus: string): Promise<void> {
  for (const pid of pids) {
    await run(TASKSET, ['-a', '-p', '-c', cpus, String(pid)], {
      onFail: (r) => new Error(`taskset could not pin pid ${pid} to CPU ${cpus}: ${r.stderr.trim()}`)
    })
  }
}
