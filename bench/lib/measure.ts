import { readFile } from 'node:fs/promises'
import { askApp, waitForAppAnswer } from '../../src/core/app-probe.js'

/** Measuring helpers for the benchmarks: percentiles, HTTP readiness, and what /proc says of a process. */

/** Nearest-rank percentile (p in 0..100); NaN for no samples. */
export function percentile (xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))] ?? NaN
}

/**
 * One GET http://host:port/; its status, or undefined when it failed or timed
 * out. `connectTimeoutMs` bounds the connection; once connected the answer
 * may take `answerTimeoutMs` (default the same): a client that hangs up on a
 * slow guest makes it write to a closed socket.
 */
export async function httpStatus (host: string, port: number, connectTimeoutMs: number, answerTimeoutMs = connectTimeoutMs): Promise<number | undefined> {
  return (await askApp({ host, port, httpPath: '/', anyStatus: true }, { connectMs: connectTimeoutMs, answerMs: answerTimeoutMs }))?.status
}

/**
 * GETs http://host:port/ until it answers 2xx/3xx (the guest on the bridge, no
 * forward), retrying every 10 ms (a connection attempt gets 1 s, an accepted
 * request 10 s); throws after `timeoutMs`.
 */
export async function untilServing (host: string, port: number, timeoutMs: number): Promise<void> {
  await waitForAppAnswer({ host, port, httpPath: '/' }, timeoutMs, undefined, { intervalMs: 10, attempt: { connectMs: 1000, answerMs: 10_000 } })
}

/** Proportional set size and resident set of a process, in KiB (/proc/PID/smaps_rollup). */
export async function memoryKiB (pid: number): Promise<{ pss: number, rss: number }> {
  const text = await readFile(`/proc/${pid}/smaps_rollup`, 'utf8')
  const kb = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN)
  return { pss: kb('Pss'), rss: kb('Rss') }
}

/** utime + stime of a process in clock ticks (/proc/PID/stat fields 14 and 15). */
export async function cpuTicks (pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8')
  // Fields after the command name (which may hold spaces) start at field 3.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return Number(fields[11]) + Number(fields[12])
}

/** MemAvailable from /proc/meminfo, in KiB. */
export async function memAvailableKiB (): Promise<number> {
  const text = await readFile('/proc/meminfo', 'utf8')
  return Number(/^MemAvailable:\s+(\d+) kB/m.exec(text)?.[1] ?? NaN)
}

/** Runs `fn` over `items` with at most `limit` at a time; results in order. */
export async function mapLimit<T, R> (items: T[], limit: number, fn: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array<R>(items.length)
  let next = 0
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++
      out[i] = await fn(items[i] as T, i)
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker))
  return out
}

/** The host's CPU time from /proc/stat, in clock ticks: busy (all but idle and iowait) and total, summed over every CPU. */
export async function hostCpuTicks (): Promise<{ busy: number, total: number }> {
  const line = (await readFile('/proc/stat', 'utf8')).split('\n')[0] ?? ''
  const t = line.trim().split(/\s+/).slice(1, 9).map(Number)
  const total = t.reduce((s, x) => s + x, 0)
  return { busy: total - (t[3] ?? 0) - (t[4] ?? 0), total }
}
