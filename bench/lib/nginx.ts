import { spawn, type ChildProcess } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { access, constants, mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { waitForAppAnswer } from '../../src/core/app-probe.js'

/**
 * nginx as a child process for the benchmarks: Debian's nginx, its
 * configuration, pid file and error log in a directory of ours, in the
 * foreground (`daemon off`), so that it is found by its pid and ends with us.
 */

export const NGINX = '/usr/sbin/nginx'

const events = 'events { worker_connections 4096; }'
/** Shared by both roles: one worker process, no access log, long-lived client connections. */
const http = 'access_log off; keepalive_timeout 65s; keepalive_requests 1000000;'

/** An nginx that answers every request with 200 "ok\n", as an upstream fast enough not to be the bottleneck. */
export function upstreamConfig (port: number): string {
  return `worker_processes 1;
${events}
http {
  ${http}
  server {
    listen 127.0.0.1:${port} reuseport;
    location / { default_type text/plain; return 200 "ok\\n"; }
  }
}
`
}

/** An nginx reverse proxy to 127.0.0.1:upstreamPort, keeping up to 64 idle upstream connections. */
export function proxyConfig (port: number, upstreamPort: number): string {
  return `worker_processes 1;
${events}
http {
  ${http}
  upstream backend {
    server 127.0.0.1:${upstreamPort};
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
    }
  }
}
`
}

/** A running nginx: the master (our child) and its one worker. */
export class NginxProcess {
  readonly name: string
  readonly port: number
  readonly dir: string
  #child: ChildProcess
  #stderr = ''

  private constructor (name: string, port: number, dir: string, child: ChildProcess) {
    this.name = name
    this.port = port
    this.dir = dir
    this.#child = child
    child.stderr?.on('data', (c: Buffer) => { this.#stderr = (this.#stderr + c.toString()).slice(-4000) })
  }

  /**
   * Writes `config` (whose server listens on 127.0.0.1:port) to `dir`, starts
   * nginx on it and waits until it answers HTTP.
   */
  static async start (name: string, dir: string, port: number, config: string, timeoutMs = 10_000): Promise<NginxProcess> {
    await access(NGINX, constants.X_OK).catch(() => {
      throw new Error(`${NGINX} is missing: apt-get install nginx-light (or nginx)`)
    })
    await mkdir(join(dir, 'logs'), { recursive: true })
    const conf = join(dir, 'nginx.conf')
    // pid and error_log here, not in /run and /var/log: -g sets them before
    // nginx reads its compiled-in defaults (and -e needs nginx ≥ 1.19.5; Debian 12 has 1.22).
    await writeFile(conf, `pid ${join(dir, 'nginx.pid')};\nerror_log ${join(dir, 'logs', 'error.log')} warn;\n${config}`)
    const child = spawn(NGINX, ['-c', conf, '-p', dir, '-e', join(dir, 'logs', 'error.log'), '-g', 'daemon off;'], { stdio: ['ignore', 'ignore', 'pipe'] })
    const nginx = new NginxProcess(name, port, dir, child)
    const exited = (): boolean => child.exitCode !== null || child.signalCode !== null
    try {
      // Any answer: a proxy whose upstream is not up yet answers 502, and is up all the same.
      await waitForAppAnswer({ host: '127.0.0.1', port, httpPath: '/', anyStatus: true }, timeoutMs, () => exited() ? 'exited' : undefined, { intervalMs: 20 })
      return nginx
    } catch {
      if (exited()) throw new Error(`nginx (${name}) exited at start: ${await nginx.errors()}`)
      await nginx.close()
      throw new Error(`nginx (${name}) did not answer on 127.0.0.1:${port} within ${timeoutMs} ms: ${await nginx.errors()}`)
    }
  }

  get pid (): number | undefined {
    return this.#child.pid
  }

  /** The master's and the workers' pids, as /proc lists the master's children. */
  async pids (): Promise<number[]> {
    const pid = this.#child.pid
    if (pid === undefined) return []
    const children = await readFile(`/proc/${pid}/task/${pid}/children`, 'utf8').catch(() => '')
    return [pid, ...children.trim().split(/\s+/).filter((s) => s !== '').map(Number)]
  }

  /** What nginx said on stderr and in its error log. */
  async errors (): Promise<string> {
    const log = await readFile(join(this.dir, 'logs', 'error.log'), 'utf8').catch(() => '')
    return `${this.#stderr}${log}`.trim().split('\n').slice(-10).join('\n') || '(nothing logged)'
  }

  /** SIGQUIT (graceful), then SIGTERM, then SIGKILL for the master and its workers, each after a deadline. */
  async close (timeoutMs = 3000): Promise<void> {
    const child = this.#child
    if (child.exitCode !== null || child.signalCode !== null) return
    const workers = (await this.pids()).slice(1)
    const closed = new Promise((resolve) => child.once('close', resolve))
    for (const signal of ['SIGQUIT', 'SIGTERM', 'SIGKILL'] as const) {
      if (signal === 'SIGKILL') for (const w of workers) killQuietly(w, signal)
      child.kill(signal)
      const done = await Promise.race([closed.then(() => true), new Promise((resolve) => setTimeout(() => resolve(false), timeoutMs))])
      if (done === true) break
    }
    // A worker outliving a master killed with SIGKILL would keep the port.
    for (const w of workers) killQuietly(w, 'SIGKILL')
  }

  /** For process 'exit' handlers: SIGKILL now, synchronously. */
  killNow (): void {
    const pid = this.#child.pid
    if (pid === undefined || this.#child.exitCode !== null) return
    try {
      // Synchronously: an exit handler cannot await.
      for (const w of readChildrenSync(pid)) killQuietly(w, 'SIGKILL')
    } catch { /* no children left */ }
    killQuietly(pid, 'SIGKILL')
  }
}

function killQuietly (pid: number, signal: NodeJS.Signals): void {
  try { process.kill(pid, signal) } catch { /* gone already */ }
}

function readChildrenSync (pid: number): number[] {
  return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter((s) => s !== '').map(Number)
}
