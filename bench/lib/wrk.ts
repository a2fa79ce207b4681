import { spawn } from 'node:child_process'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'

/**
 * wrk as the benchmarks' load generator: a C program in a process of its own,
 * so that the generator is faster than the proxy it loads (fact 17 of the
 * design: the loopback upstream alone answers about 125k req/s with wrk,
 * about 76k with autocannon inside the benchmark's Node process).
 *
 * Its figures come from a Lua `done()` hook that prints one JSON line, not
 * from its human-readable report, whose units change with the magnitude
 * ("812.00us", "1.20ms", "12.34k").
 */

export const WRK = '/usr/bin/wrk'

/** The line prefix that marks the hook's JSON among wrk's own output. */
const MARK = 'UIGNITER_WRK_JSON '

/**
 * wrk's done() hook: latency percentiles are in microseconds, as wrk keeps
 * them; summary.errors.status counts answers with a status above 399.
 */
const DONE_SCRIPT = `
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('${MARK}{"durationUs":%d,"requests":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50Us":%d,"p90Us":%d,"p99Us":%d,"p999Us":%d,"minUs":%d,"maxUs":%d,"meanUs":%f}\\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.min, latency.max, latency.mean))
end
`

export interface WrkOptions {
  url: string
  /** Extra request headers, e.g. `{ Host: 'up' }` (wrk takes a Host header given here over the URL's). */
  headers?: Record<string, string>
  /** wrk's -t: threads; at most `connections`. */
  threads: number
  /** wrk's -c: connections, spread over the threads. */
  connections: number
  durationS: number
  /** A directory for the Lua script (the benchmark's temp dir). */
  scriptDir: string
  /** CPUs to pin wrk to (taskset -c LIST), e.g. "0"; undefined: not pinned. */
  cpus?: string
  /** wrk's --timeout in seconds: a request slower than this counts as a timeout. */
  requestTimeoutS?: number
  /** Called with wrk's pid once it runs (to measure its CPU, or to kill it). */
  onStart?: (pid: number) => void
}

export interface WrkResult {
  /** Answers counted by wrk (any status) and the time they took. */
  requests: number
  durationS: number
  /** Answers per second with a status below 400. */
  rps: number
  /** Answers with a status above 399. */
  non2xx: number
  /** Socket errors: connect, read, write, timeout. */
  errors: { connect: number, read: number, write: number, timeout: number }
  /** Latency in ms (wrk's histogram has microsecond resolution). */
  p50Ms: number
  p90Ms: number
  p99Ms: number
  p999Ms: number
  minMs: number
  maxMs: number
  meanMs: number
}

interface HookOutput {
  durationUs: number
  requests: number
  bytes: number
  connect: number
  read: number
  write: number
  status: number
  timeout: number
  p50Us: number
  p90Us: number
  p99Us: number
  p999Us: number
  minUs: number
  maxUs: number
  meanUs: number
}

/** Writes the done() hook into `dir` (idempotent) and returns its path. */
export async function writeWrkScript (dir: string): Promise<string> {
  const path = join(dir, 'uigniter-wrk-done.lua')
  await writeFile(path, DONE_SCRIPT)
  return path
}

/** The figures of wrk's output: the hook's JSON line; throws when there is none. */
export function parseWrkOutput (stdout: string): WrkResult {
  const line = stdout.split('\n').find((l) => l.startsWith(MARK))
  if (line === undefined) throw new Error(`wrk printed no summary (the Lua done() hook did not run):\n${stdout.slice(-1000)}`)
  const h = JSON.parse(line.slice(MARK.length)) as HookOutput
  const durationS = h.durationUs / 1e6
  const ms = (us: number): number => us / 1000
  return {
    requests: h.requests,
    durationS,
    rps: durationS > 0 ? (h.requests - h.status) / durationS : NaN,
    non2xx: h.status,
    errors: { connect: h.connect, read: h.read, write: h.write, timeout: h.timeout },
    p50Ms: ms(h.p50Us),
    p90Ms: ms(h.p90Us),
    p99Ms: ms(h.p99Us),
    p999Ms: ms(h.p999Us),
    minMs: ms(h.minUs),
    maxMs: ms(h.maxUs),
    meanMs: ms(h.meanUs)
  }
}

/** The command line: taskset in front when pinned (it execs wrk, so the pid stays wrk's). */
export function wrkCommand (o: Omit<WrkOptions, 'scriptDir' | 'onStart'>, script: string): string[] {
  if (o.connections < 1 || o.threads < 1 || o.durationS < 1) throw new RangeError('wrk needs at least one thread, one connection and one second')
  const args = [
    WRK, '-t', String(Math.min(o.threads, o.connections)), '-c', String(o.connections), '-d', `${o.durationS}s`,
    '--timeout', `${o.requestTimeoutS ?? 10}s`, '--latency', '-s', script
  ]
  for (const [name, value] of Object.entries(o.headers ?? {})) args.push('-H', `${name}: ${value}`)
  args.push(o.url)
  return o.cpus === undefined ? args : ['taskset', '-c', o.cpus, ...args]
}

/** One wrk run to its end; rejects when wrk fails or overruns its duration by 30 s. */
export async function runWrk (o: WrkOptions): Promise<WrkResult> {
  const script = await writeWrkScript(o.scriptDir)
  const [cmd = WRK, ...args] = wrkCommand(o, script)
  return await new Promise<WrkResult>((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (c: Buffer) => { stdout = (stdout + c.toString()).slice(-20_000) })
    child.stderr.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
    const deadlineMs = (o.durationS + 30) * 1000
    const timer = setTimeout(() => child.kill('SIGKILL'), deadlineMs)
    if (child.pid !== undefined) o.onStart?.(child.pid)
    child.on('error', (err) => {
      clearTimeout(timer)
      reject(new Error(`${cmd} could not start: ${err.message} (apt-get install wrk util-linux)`, { cause: err }))
    })
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      if (code !== 0) {
        reject(new Error(`wrk exited with ${code ?? signal ?? '?'}${signal === 'SIGKILL' ? ` (killed after ${deadlineMs} ms)` : ''}: ${stderr.trim() || stdout.trim().slice(-500)}`))
        return
      }
      try { resolve(parseWrkOutput(stdout)) } catch (err) { reject(err instanceof Error ? err : new Error(String(err))) }
    })
  })
}
