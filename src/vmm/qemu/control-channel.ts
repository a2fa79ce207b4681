import { EventEmitter } from 'node:events'
import { connect, type Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { UigniterError } from '../../core/errors.js'

export type ControlReply = { ok: true } & Record<string, unknown>
export type ControlEvent = { event: string } & Record<string, unknown>

/**
 * The longest line taken from the guest. The init's replies are a few
 * hundred characters; a longer line is not one of them, and is dropped as it
 * comes (never held whole) rather than buffered without bound.
 */
export const MAX_CONTROL_LINE = 64 * 1024

/**
 * The host side of the control channel: a virtio-console port that QEMU
 * exposes as a unix socket. The host sends `VERB key=value...` lines; the
 * guest init answers each with one JSON line, in order, and also sends
 * unsolicited `{"event": ...}` lines (emitted as 'event', and awaited with
 * waitForEvent): `waiting` while its app waits for an identity, `exit`.
 */
export class ControlChannel extends EventEmitter {
  readonly #socket: Socket
  readonly #pending: Array<{ verb: string, resolve: (r: ControlReply) => void, reject: (e: Error) => void, timer: NodeJS.Timeout }> = []
  #buffer = ''
  /** Dropping the rest of an overlong line, up to its newline. */
  #skipping = false

  private constructor (socket: Socket) {
    super()
    this.#socket = socket
    socket.setEncoding('utf8')
    socket.on('data', (text: string) => this.#onData(text))
    socket.on('close', () => this.#failAll(new UigniterError('UIG_ERR_CONTROL_CHANNEL', 'the control channel closed (the VM stopped?)')))
    socket.on('error', () => {})
  }

  /** Connects, retrying while QEMU has not created the socket yet, up to `timeoutMs`. */
  static async connect (path: string, timeoutMs = 5000): Promise<ControlChannel> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path)
          s.once('connect', () => resolve(s))
          s.once('error', reject)
        })
        return new ControlChannel(socket)
      } catch (err) {
        if (Date.now() > deadline) {
          throw new UigniterError('UIG_ERR_CONTROL_CHANNEL', `cannot connect to the control channel ${path}: ${(err as Error).message}`, { cause: err })
        }
        await sleep(20)
      }
    }
  }

  /** Sends one command and resolves with the guest's reply; rejects on `ok:false` or after `timeoutMs`. */
  async request (verb: string, params: Record<string, string | number> = {}, timeoutMs = 5000): Promise<ControlReply> {
    const line = [verb, ...Object.entries(params).map(([k, v]) => `${k}=${v}`)].join(' ')
    // Only the verb's first word goes into messages: the rest may carry the app's environment.
    const name = verb.split(' ', 1)[0] ?? verb
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const i = this.#pending.findIndex((p) => p.timer === timer)
        if (i >= 0) this.#pending.splice(i, 1)
        reject(new UigniterError('UIG_ERR_CONTROL_CHANNEL', `the guest did not answer "${name}" within ${timeoutMs} ms`))
      }, timeoutMs)
      this.#pending.push({ verb: name, resolve, reject, timer })
      this.#socket.write(line + '\n')
    })
  }

  /**
   * Resolves with the first event (from now on) that `match` accepts;
   * rejects when the channel closes first or after `timeoutMs`, with
   * `describe` naming what was awaited.
   */
  async waitForEvent (match: (event: ControlEvent) => boolean, timeoutMs: number, describe = 'the event'): Promise<ControlEvent> {
    if (this.#socket.destroyed) throw new UigniterError('UIG_ERR_CONTROL_CHANNEL', `the control channel is closed; ${describe} cannot arrive`)
    return await new Promise((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer)
        this.off('event', onEvent)
        this.#socket.off('close', onClose)
      }
      const onEvent = (event: ControlEvent): void => {
        if (!match(event)) return
        done()
        resolve(event)
      }
      const onClose = (): void => {
        done()
        reject(new UigniterError('UIG_ERR_CONTROL_CHANNEL', `the control channel closed before ${describe} (the VM stopped?)`))
      }
      const timer = setTimeout(() => {
        done()
        reject(new UigniterError('UIG_ERR_CONTROL_CHANNEL', `the guest did not send ${describe} within ${timeoutMs} ms`))
      }, timeoutMs)
      this.on('event', onEvent)
      this.#socket.once('close', onClose)
    })
  }

  /** True once either side ended the connection. */
  get closed (): boolean {
    return this.#socket.destroyed
  }

  close (): void {
    this.#socket.destroy()
  }

  /**
   * Everything here is the guest's, and the guest is not trusted: no line
   * may throw, grow a buffer past MAX_CONTROL_LINE, or answer a request
   * that is not next in line.
   */
  #onData (text: string): void {
    let nl: number
    while ((nl = text.indexOf('\n')) >= 0) {
      const piece = text.slice(0, nl)
      text = text.slice(nl + 1)
      if (this.#skipping || this.#buffer.length + piece.length > MAX_CONTROL_LINE) {
        this.#buffer = ''
        this.#skipping = false
        this.#malformed(`a line longer than ${MAX_CONTROL_LINE} characters`)
        continue
      }
      const line = (this.#buffer + piece).trim()
      this.#buffer = ''
      if (line !== '') this.#onLine(line)
    }
    if (this.#skipping) return
    if (this.#buffer.length + text.length > MAX_CONTROL_LINE) {
      this.#buffer = ''
      this.#skipping = true
      return
    }
    this.#buffer += text
  }

  #onLine (line: string): void {
    // Not the start of a message: the tail of a line torn when an earlier host connection went away. Skipped.
    if (line.charCodeAt(0) !== 123 /* { */) return
    let msg: unknown
    try {
      msg = JSON.parse(line)
    } catch {
      this.#malformed('a line that is not JSON')
      return
    }
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
      this.#malformed('a line that is not a JSON object')
      return
    }
    const m = msg as Record<string, unknown>
    if (typeof m.event === 'string') {
      this.emit('event', m)
      return
    }
    if (typeof m.ok !== 'boolean') {
      this.#malformed('a reply without "ok"')
      return
    }
    const waiter = this.#pending.shift()
    if (waiter === undefined) return
    clearTimeout(waiter.timer)
    if (m.ok) waiter.resolve(m as ControlReply)
    else waiter.reject(new UigniterError('UIG_ERR_CONTROL_CHANNEL', `the guest refused "${waiter.verb}": ${typeof m.error === 'string' ? m.error.slice(0, 500) : 'no reason given'}`))
  }

  /** A line that is no reply and no event stands in the place of the next reply: that request fails, the others keep their order. */
  #malformed (what: string): void {
    const waiter = this.#pending.shift()
    if (waiter === undefined) return
    clearTimeout(waiter.timer)
    waiter.reject(new UigniterError('UIG_ERR_CONTROL_CHANNEL', `the guest answered "${waiter.verb}" with ${what}`))
  }

  #failAll (err: Error): void {
    for (const p of this.#pending.splice(0)) {
      clearTimeout(p.timer)
      p.reject(err)
    }
  }
}
