import { spawn } from 'node:child_process'
import { mkdirSync, openSync, readFileSync } from 'node:fs'
import { request, type IncomingMessage } from 'node:http'
import { join } from 'node:path'
import { loadConfig, type Config } from '../core/config.js'
import { UigniterError, errorCodes, type ErrorCode } from '../core/errors.js'
import { packageRoot } from '../core/package-paths.js'
import { socketAnswers } from '../core/socket-answers.js'
import { eventStreamParser, type ServerSentEvent } from '../core/event-stream.js'

export { eventStreamParser, type ServerSentEvent }

/**
 * The CLI's only way to act on VMs: HTTP to the daemon over its unix socket
 * (or to UIGNITER_HOST, e.g. http://10.0.0.5:7377, with UIGNITER_TOKEN).
 * API errors come back as UigniterErrors with the daemon's code and message.
 */
export class ApiClient {
  readonly #config: Config
  readonly #remote: URL | undefined

  constructor (config: Config, env: NodeJS.ProcessEnv = process.env) {
    this.#config = config
    this.#remote = env.UIGNITER_HOST !== undefined ? new URL(env.UIGNITER_HOST) : undefined
  }

  async call<T> (method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.#send(method, path, body)
    const text = await readBody(res)
    if ((res.statusCode ?? 500) >= 400) throw toError(res.statusCode ?? 500, text)
    const type = res.headers['content-type'] ?? ''
    return (type.includes('application/json') ? JSON.parse(text) : text) as T
  }

  /** Streams a response body chunk by chunk until the server ends it. */
  async stream (path: string, onChunk: (text: string) => void, signal?: AbortSignal): Promise<void> {
    const res = await this.#send('GET', path, undefined, signal)
    if ((res.statusCode ?? 500) >= 400) throw toError(res.statusCode ?? 500, await readBody(res))
    res.setEncoding('utf8')
    for await (const chunk of res) onChunk(chunk as string)
  }

  /**
   * Follows a server-sent event stream (`/v1/events`). Resolves once the
   * daemon answered, so that no event after that moment is missed; `onEvent`
   * gets each event as it comes. `ended` settles when the stream does: it
   * resolves when the daemon closes it or `signal` aborts it, and rejects
   * with UIG_ERR_DAEMON_UNREACHABLE when the connection fails.
   */
  async followEvents (path: string, onEvent: (event: ServerSentEvent) => void, signal: AbortSignal): Promise<{ ended: Promise<void> }> {
    const res = await this.#send('GET', path, undefined, signal)
    if ((res.statusCode ?? 500) >= 400) throw toError(res.statusCode ?? 500, await readBody(res))
    const parse = eventStreamParser(onEvent)
    res.setEncoding('utf8')
    const ended = (async () => {
      try {
        for await (const chunk of res) parse(chunk as string)
      } catch (err) {
        if (signal.aborted) return
        throw new UigniterError('UIG_ERR_DAEMON_UNREACHABLE', `the daemon's event stream broke: ${(err as Error).message}`, { cause: err })
      }
    })()
    return { ended }
  }

  async #send (method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<IncomingMessage> {
    const payload = body === undefined ? undefined : JSON.stringify(body)
    const headers: Record<string, string> = {}
    if (payload !== undefined) headers['content-type'] = 'application/json'
    if (this.#remote !== undefined && this.#config.api.token !== undefined) headers.authorization = `Bearer ${this.#config.api.token}`
    const target = this.#remote !== undefined
      ? { host: this.#remote.hostname, port: Number(this.#remote.port || 80) }
      : { socketPath: this.#config.api.socket }
    return await new Promise((resolve, reject) => {
      const req = request({ ...target, method, path, headers, ...(signal !== undefined ? { signal } : {}) }, resolve)
      req.on('error', (err) => reject(new UigniterError('UIG_ERR_DAEMON_UNREACHABLE', `cannot reach the daemon at ${this.#remote?.href ?? this.#config.api.socket}: ${err.message}`, { cause: err })))
      req.end(payload)
    })
  }

  /**
   * Makes sure a daemon answers: when none does on the local socket, starts
   * one in the background (log in `<dataDir>/daemon.log`) and waits for it.
   */
  async ensureDaemon (timeoutMs = 60_000): Promise<void> {
    if (this.#remote !== undefined || await socketAnswers(this.#config.api.socket)) return
    mkdirSync(this.#config.dataDir, { recursive: true })
    const logPath = join(this.#config.dataDir, 'daemon.log')
    const out = openSync(logPath, 'a')
    const child = spawn(process.execPath, [join(packageRoot, 'dist/src/daemon/main.js'), 'daemon'], { detached: true, stdio: ['ignore', out, out], env: process.env })
    child.unref()
    const deadline = Date.now() + timeoutMs
    while (Date.now() < deadline) {
      if (await socketAnswers(this.#config.api.socket)) return
      if (child.exitCode !== null) break
      await new Promise((resolve) => setTimeout(resolve, 200))
    }
    const tail = readFileSync(logPath, 'utf8').trim().split('\n').slice(-5).join('\n')
    throw new UigniterError('UIG_ERR_DAEMON_UNREACHABLE', `started a daemon but it does not answer on ${this.#config.api.socket}; its log (${logPath}) ends with:\n${tail}`)
  }
}

async function readBody (res: IncomingMessage): Promise<string> {
  res.setEncoding('utf8')
  let text = ''
  for await (const chunk of res) text += chunk as string
  return text
}

function toError (status: number, text: string): UigniterError {
  try {
    const body = JSON.parse(text) as { code?: string, message?: string }
    if (body.code !== undefined && body.code in errorCodes) return new UigniterError(body.code as ErrorCode, body.message ?? text)
  } catch { /* not JSON */ }
  return new UigniterError('UIG_ERR_INTERNAL', `the daemon answered ${status}: ${text.slice(0, 500)}`)
}

/** The CLI's client: the configured daemon, started first if none answers. */
export async function daemonClient (): Promise<ApiClient> {
  const api = new ApiClient(loadConfig())
  await api.ensureDaemon()
  return api
}
