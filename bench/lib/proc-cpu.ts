import { readFile } from 'node:fs/promises'

/**
 * A process's CPU in clock ticks from /proc/PID/stat: its own (utime +
 * stime) and its waited-for children's (cutime + cstime: for the daemon,
 * the `ip` and `nft` it ran). Undefined once the process is gone.
 */
export async function procCpuTicks (pid: number): Promise<{ self: number, children: number } | undefined> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8')
    // Fields after the command name (which may hold spaces) start at field 3.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ').map(Number)
    return { self: (f[11] ?? 0) + (f[12] ?? 0), children: (f[13] ?? 0) + (f[14] ?? 0) }
  } catch {
    return undefined
  }
}

/** The sum of utime + stime over the processes still there, in clock ticks; those gone count 0. */
export async function sumCpuTicks (pids: Iterable<number>): Promise<number> {
  let total = 0
  const all = [...pids]
  // In slices: a thousand reads at once would hold a thousand file handles.
  for (let i = 0; i < all.length; i += 64) {
    const got = await Promise.all(all.slice(i, i + 64).map(procCpuTicks))
    for (const t of got) total += t?.self ?? 0
  }
  return total
}
