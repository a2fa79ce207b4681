import { EventEmitter } from 'node:events'
import { connect, type Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { UigniterError } from '../../core/errors.js'

/** An asynchronous message from QEMU: `SHUTDOWN`, `STOP`, `RESUME`, ... */
export interface QmpEvent {
  event: string
  data: Record<string, unknown>
  timestamp: { seconds: number, microseconds: number }
}

/** QEMU's greeting: its version and the capabilities it offers. */
export interface QmpGreeting {
  version: { qemu: { major: number, minor: number, micro: number }, package: string }
  capabilities: string[]
}

/** `query-status`: `status` is QEMU's RunState (`running`, `paused`, `shutdown`, ...). */
export interface QmpStatus { running: boolean, status: string }

/** `query-cpus-fast`, the fields we use: each vCPU and the host thread that runs it. */
export interface QmpCpu { 'cpu-index': number, 'thread-id': number }

/** A command QEMU refused: its error class (`GenericError`, `CommandNotFound`, ...) and description. */
export class QmpError extends UigniterError {
  readonly qmpClass: string
  readonly desc: string

  constructor (command: string, qmpClass: string, desc: string) {
    super('UIG_ERR_QMP', `QEMU refused "${command}": ${qmpClass}: ${desc}`)
    this.qmpClass = qmpClass
    this.desc = desc
  }
}

/**
 * The longest line taken from QEMU. Its largest answers (query-qmp-schema)
 * are a few hundred KiB; past this, a line is dropped as it comes (never held
 * whole) and the request it answered fails. A QEMU a guest has taken over
 * is no more trusted than the guest.
 */
export const MAX_QMP_LINE = 8 * 1024 * 1024

interface Pending {
  command: string
  resolve: (value: unknown) => void
  reject: (err: Error) => void
  timer: NodeJS.Timeout
}

/**
 * A client of QEMU's machine protocol (QMP) over its unix socket: JSON
 * objects, one per line. After QEMU's greeting the client negotiates
 * capabilities; then commands can be pipelined, each carrying an `id` that
 * QEMU echoes in its reply. Events: 'event' (QmpEvent) and 'close' (QEMU
 * went away, or close() was called).
 *
 * @example
 * const qmp = await QmpClient.connect('/var/lib/uigniter/vms/ID/qmp.sock')
 * qmp.on('event', (e: QmpEvent) => log.info(e.event))
 * await qmp.stop()
 * const { status } = await qmp.queryStatus() // 'paused'
 */
export class QmpClient extends EventEmitter {
  readonly #socket: Socket
  readonly #pending = new Map<number, Pending>()
  readonly #greeted: Promise<QmpGreeting>
  #greeting: QmpGreeting | undefined
  #onGreeting: ((g: QmpGreeting) => void) | undefined
  #onBadGreeting: ((err: Error) => void) | undefined
  #nextId = 1
  #buffer = ''
  /** Dropping the rest of an overlong line, up to its newline. */
  #skipping = false
  #closed = false

  /** One 'data' listener from the first byte: a stream with none would drop what arrives. */
  private constructor (socket: Socket) {
    super()
    this.#socket = socket
    this.#greeted = new Promise((resolve, reject) => {
      this.#onGreeting = resolve
      this.#onBadGreeting = reject
    })
    // Only awaited while connecting; a greeting refused later (or never awaited) must not be an unhandled rejection.
    this.#greeted.catch(() => {})
    socket.setEncoding('utf8')
    socket.on('data', (text: string) => this.#onData(text))
    socket.on('close', () => this.#onClose())
    socket.on('error', () => { /* 'close' follows and fails what is pending */ })
  }

  /**
   * Connects and negotiates capabilities. Retries while QEMU has not created
   * the socket yet or refuses connections, up to `timeoutMs` in all: a QMP
   * socket takes one client at a time, so a second one waits without a greeting.
   */
  static async connect (path: string, options: { timeoutMs?: number } = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? 5000
    const deadline = Date.now() + timeoutMs
    let lastError: unknown
    while (Date.now() < deadline) {
      let client: QmpClient | undefined
      try {
        client = new QmpClient(await openSocket(path, deadline - Date.now()))
        await client.#waitForGreeting(deadline - Date.now())
        await client.execute('qmp_capabilities', undefined, { timeoutMs: Math.max(1, deadline - Date.now()) })
        return client
      } catch (err) {
        // QEMU closing on us (it is starting or ending) is worth a retry; a refusal or silence is not.
        const closedByQemu = client?.closed === true
        client?.close()
        lastError = err
        if (err instanceof UigniterError && !closedByQemu) throw err
        await sleep(20)
      }
    }
    throw new UigniterError('UIG_ERR_QMP', `cannot connect to QEMU's monitor at ${path} within ${timeoutMs} ms: ${lastError instanceof Error ? lastError.message : 'no answer'}`, { cause: lastError })
  }

  /** QEMU's greeting: its version and the capabilities it offers. */
  get greeting (): QmpGreeting {
    if (this.#greeting === undefined) throw new UigniterError('UIG_ERR_QMP', 'QEMU has not greeted yet')
    return this.#greeting
  }

  get closed (): boolean {
    return this.#closed
  }

  /**
   * Runs a command and resolves with its `return` value. Rejects with a
   * QmpError when QEMU refuses it, or UIG_ERR_QMP when the connection closes
   * or QEMU does not answer within `timeoutMs` (default 10 s).
   */
  async execute<T = unknown> (command: string, args?: Record<string, unknown>, options: { timeoutMs?: number } = {}): Promise<T> {
    if (this.#closed) throw new UigniterError('UIG_ERR_QMP', `cannot run "${command}": the QMP connection is closed (QEMU has ended?)`)
    const timeoutMs = options.timeoutMs ?? 10_000
    const id = this.#nextId++
    return await new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id)
        reject(new UigniterError('UIG_ERR_QMP', `QEMU did not answer "${command}" within ${timeoutMs} ms`))
      }, timeoutMs)
      this.#pending.set(id, { command, resolve: resolve as (value: unknown) => void, reject, timer })
      this.#socket.write(JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id }) + '\n')
    })
  }

  async queryStatus (): Promise<QmpStatus> {
    const r = await this.execute<unknown>('query-status')
    if (!isObject(r) || typeof r.running !== 'boolean' || typeof r.status !== 'string') throw malformed('query-status', 'not a status')
    return { running: r.running, status: r.status }
  }

  async queryCpus (): Promise<QmpCpu[]> {
    const r = await this.execute<unknown>('query-cpus-fast')
    if (!Array.isArray(r) || !r.every((c) => isObject(c) && Number.isInteger(c['cpu-index']) && Number.isInteger(c['thread-id']))) {
      throw malformed('query-cpus-fast', 'not a list of vCPUs')
    }
    return r as QmpCpu[]
  }

  /** Pauses every vCPU (QEMU emits STOP). */
  async stop (): Promise<void> {
    await this.execute('stop')
  }

  /** Resumes the vCPUs (QEMU emits RESUME). */
  async cont (): Promise<void> {
    await this.execute('cont')
  }

  /**
   * Asks QEMU to exit (SHUTDOWN with reason `host-qmp-quit`). QEMU may close
   * the socket before its reply arrives; that counts as done.
   */
  async quit (): Promise<void> {
    try {
      await this.execute('quit')
    } catch (err) {
      if (!this.#closed) throw err
    }
  }

  /** Resets the machine; with `-no-reboot` (our guests) that ends QEMU. */
  async systemReset (): Promise<void> {
    await this.execute('system_reset')
  }

  /** Drops the connection; QEMU keeps running and accepts the next client. */
  close (): void {
    this.#socket.destroy()
  }

  /**
   * No line may throw, grow the buffer past MAX_QMP_LINE, or answer a
   * request other than its own.
   */
  #onData (text: string): void {
    let nl: number
    while ((nl = text.indexOf('\n')) >= 0) {
      const piece = text.slice(0, nl)
      text = text.slice(nl + 1)
      if (this.#skipping || this.#buffer.length + piece.length > MAX_QMP_LINE) {
        this.#buffer = ''
        this.#skipping = false
        this.#malformed(`a line longer than ${MAX_QMP_LINE} characters`)
        continue
      }
      const line = (this.#buffer + piece).trim()
      this.#buffer = ''
      if (line !== '') this.#onMessage(line)
    }
    if (this.#skipping) return
    if (this.#buffer.length + text.length > MAX_QMP_LINE) {
      this.#buffer = ''
      this.#skipping = true
      return
    }
    this.#buffer += text
  }

  async #waitForGreeting (timeoutMs: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined
    let onClose: (() => void) | undefined
    try {
      await Promise.race([
        this.#greeted,
        new Promise((_resolve, reject) => {
          // Another client holds the monitor: QEMU accepts the connection but stays silent.
          timer = setTimeout(() => reject(new Error('no greeting (is another client connected?)')), Math.max(1, timeoutMs))
          onClose = () => reject(new Error('closed before the greeting'))
          if (this.#closed) onClose()
          else this.once('close', onClose)
        })
      ])
    } finally {
      clearTimeout(timer)
      if (onClose !== undefined) this.off('close', onClose)
    }
  }

  #onMessage (line: string): void {
    let parsed: unknown
    try {
      parsed = JSON.parse(line)
    } catch {
      this.#malformed('a line that is not JSON')
      return
    }
    if (!isObject(parsed)) {
      this.#malformed('a line that is not a JSON object')
      return
    }
    const msg = parsed
    if (this.#greeting === undefined) {
      // Nothing but the greeting is expected first; anything else cannot be ours and is skipped.
      if (!('QMP' in msg)) return
      const greeting = asGreeting(msg.QMP)
      if (greeting === undefined) {
        this.#onBadGreeting?.(new UigniterError('UIG_ERR_QMP', 'QEMU\'s greeting is malformed (no version or capabilities)'))
        this.close()
        return
      }
      this.#greeting = greeting
      this.#onGreeting?.(greeting)
      return
    }
    if (typeof msg.event === 'string') {
      const ts = isObject(msg.timestamp) ? msg.timestamp : {}
      const event: QmpEvent = {
        event: msg.event.slice(0, 200),
        data: isObject(msg.data) ? msg.data : {},
        timestamp: {
          seconds: typeof ts.seconds === 'number' ? ts.seconds : 0,
          microseconds: typeof ts.microseconds === 'number' ? ts.microseconds : 0
        }
      }
      this.emit('event', event)
      return
    }
    if (!('return' in msg) && !('error' in msg)) {
      this.#malformed('a message that is no reply, event or greeting')
      return
    }
    // A reply without an id can only answer a request QEMU could not parse; give it to the oldest. One with an id
    // that is not a request of ours (a stale one, timed out already, or a forged one) answers nothing.
    const id = 'id' in msg ? msg.id : this.#pending.keys().next().value
    if (typeof id !== 'number') return
    const waiter = this.#pending.get(id)
    if (waiter === undefined) return
    this.#pending.delete(id)
    clearTimeout(waiter.timer)
    if ('return' in msg) {
      waiter.resolve(msg.return)
    } else {
      const error = isObject(msg.error) ? msg.error : {}
      const text = (v: unknown, or: string): string => typeof v === 'string' ? v.slice(0, 1000) : or
      waiter.reject(new QmpError(waiter.command, text(error.class, 'UnknownError'), text(error.desc, line.slice(0, 200))))
    }
  }

  /** A line that is no message stands in the place of the oldest request's reply (QEMU answers in order): that one fails. */
  #malformed (what: string): void {
    if (this.#greeting === undefined) {
      this.#onBadGreeting?.(new UigniterError('UIG_ERR_QMP', `QEMU's monitor sent ${what} instead of its greeting`))
      this.close()
      return
    }
    const first = this.#pending.entries().next().value
    if (first === undefined) return
    const [id, waiter] = first
    this.#pending.delete(id)
    clearTimeout(waiter.timer)
    waiter.reject(malformed(waiter.command, what))
  }

  #onClose (): void {
    if (this.#closed) return
    this.#closed = true
    for (const [id, p] of this.#pending) {
      this.#pending.delete(id)
      clearTimeout(p.timer)
      p.reject(new UigniterError('UIG_ERR_QMP', `the QMP connection closed before QEMU answered "${p.command}" (QEMU has ended?)`))
    }
    this.emit('close')
  }
}

function isObject (v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

function malformed (command: string, what: string): UigniterError {
  return new UigniterError('UIG_ERR_QMP', `QEMU answered "${command}" with ${what}`)
}

/** The greeting if it has the shape QmpGreeting promises, else undefined. */
function asGreeting (v: unknown): QmpGreeting | undefined {
  if (!isObject(v) || !isObject(v.version) || !isObject(v.version.qemu) || !Array.isArray(v.capabilities)) return undefined
  const q = v.version.qemu
  if (!Number.isInteger(q.major) || !Number.isInteger(q.minor) || !Number.isInteger(q.micro)) return undefined
  return {
    version: { qemu: { major: q.major as number, minor: q.minor as number, micro: q.micro as number }, package: typeof v.version.package === 'string' ? v.version.package : '' },
    capabilities: v.capabilities.filter((c): c is string => typeof c === 'string')
  }
}

async function openSocket (path: string, timeoutMs: number): Promise<Socket> {
  return await new Promise((resolve, reject) => {
    const socket = connect(path)
    const timer = setTimeout(() => { socket.destroy(); reject(new Error('connect timed out')) }, Math.max(1, timeoutMs))
    socket.once('connect', () => { clearTimeout(timer); resolve(socket) })
    socket.once('error', (err) => { clearTimeout(timer); reject(err) })
  })
}
