import { spawn, type ChildProcess } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { waitForAppAnswer } from '../../src/core/app-probe.js'
import { NGINX } from './nginx.js'

/**
 * An upstream nginx (one worker, 200 "ok\n", as bench/lib/nginx.ts's
 * upstreamConfig) inside a network namespace, listening on its address there:
 * a stand-in for a VM's HTTP server. `ip netns exec` execs nginx, so the
 * child's pid is nginx's master.
 */
export class NetnsNginx {
  readonly netns: string
  readonly host: string
  readonly port: number
  readonly #dir: string
  readonly #child: ChildProcess
  #stderr = ''

  private constructor (netns: string, host: string, port: number, dir: string, child: ChildProcess) {
    this.netns = netns
    this.host = host
    this.port = port
    this.#dir = dir
    this.#child = child
    child.stderr?.on('data', (c: Buffer) => { this.#stderr = (this.#stderr + c.toString()).slice(-4000) })
  }

  /** Starts it and waits until it answers from the root netns (which proves the route to it, too). */
  static async start (netns: string, host: string, port: number, dir: string, timeoutMs = 10_000): Promise<NetnsNginx> {
    await mkdir(dir, { recursive: true })
    const conf = join(dir, 'nginx.conf')
    const log = join(dir, 'error.log')
    await writeFile(conf, `pid ${join(dir, 'nginx.pid')};
error_log ${log} warn;
worker_processes 1;
events { worker_connections 4096; }
http {
  access_log off; keepalive_timeout 65s; keepalive_requests 1000000;
  server {
    listen ${host}:${port};
    location / { default_type text/plain; return 200 "ok\\n"; }
  }
}
`)
    const child = spawn('ip', ['netns', 'exec', netns, NGINX, '-c', conf, '-p', dir, '-e', log, '-g', 'daemon off;'], { stdio: ['ignore', 'ignore', 'pipe'] })
    const nginx = new NetnsNginx(netns, host, port, dir, child)
    const exited = (): boolean => child.exitCode !== null || child.signalCode !== null
    try {
      await waitForAppAnswer({ host, port, httpPath: '/' }, timeoutMs, () => exited() ? 'exited' : undefined, { intervalMs: 20 })
      return nginx
    } catch {
      const why = exited() ? 'exited at start' : `did not answer on ${host}:${port} within ${timeoutMs} ms`
      nginx.killNow()
      throw new Error(`nginx in netns ${netns} ${why}: ${await nginx.errors()}`)
    }
  }

  /** The master's and its workers' pids. */
  pids (): number[] {
    const pid = this.#child.pid
    if (pid === undefined) return []
    return [pid, ...childrenOf(pid)]
  }

  async errors (): Promise<string> {
    const log = await readFile(join(this.#dir, 'error.log'), 'utf8').catch(() => '')
    return `${this.#stderr}${log}`.trim().split('\n').slice(-10).join('\n') || '(nothing logged)'
  }

  /** SIGQUIT (graceful), then SIGKILL for the master and its workers after a deadline. */
  async close (timeoutMs = 3000): Promise<void> {
    const child = this.#child
    if (child.exitCode !== null || child.signalCode !== null) return
    const workers = this.pids().slice(1)
    const closed = new Promise((resolve) => child.once('close', resolve))
    child.kill('SIGQUIT')
    const done = await Promise.race([closed.then(() => true), new Promise((resolve) => setTimeout(() => resolve(false), timeoutMs))])
    if (done !== true) this.killNow()
    // A worker outliving its master would keep the netns's port.
    for (const w of workers) killQuietly(w)
  }

  /** For exit handlers: SIGKILL now, master and workers. */
  killNow (): void {
    const pid = this.#child.pid
    if (pid === undefined || this.#child.exitCode !== null) return
    for (const w of childrenOf(pid)) killQuietly(w)
    killQuietly(pid)
  }
}

function childrenOf (pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter((s) => s !== '').map(Number)
  } catch {
    return []
  }
}

function killQuietly (pid: number): void {
  try { process.kill(pid, 'SIGKILL') } catch { /* gone already */ }
}
