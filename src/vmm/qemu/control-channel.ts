import { EventEmitter } from 'node:events'
import { connect, type Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { UigniterError } from '../../core/errors.js'

export type ControlReply = { ok: true } & Record<string, unknown>
export type ControlEvent = { event: string } & Record<string, unknown>

/**
 * The host side of the control channel: a virtio-console port that QEMU
 * exposes as a unix socket. The host sends `VERB key=value...` lines; the
 * guest init answers each with one JSON line, in order, and also sends
 * unsolicited `{"event": ...}` lines (emitted as 'event').
 */
export class ControlChannel extends EventEmitter {
  readonly #socket: Socket
  readonly #pending: Array<{ resolve: (r: ControlReply) => void, reject: (e: Error) => void, timer: NodeJS.Timeout }> = []
  #buffer = ''

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
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const i = this.#pending.findIndex((p) => p.timer === timer)
        if (i >= 0) this.#pending.splice(i, 1)
        reject(new UigniterError('UIG_ERR_CONTROL_CHANNEL', `the guest did not answer "${verb}" within ${timeoutMs} ms`))
      }, timeoutMs)
      this.#pending.push({ resolve, reject, timer })
      this.#socket.write(line + '\n')
    })
  }

  close (): void {
    this.#socket.destroy()
  }

  #onData (text: string): void {
    this.#buffer += text
    let nl: number
    while ((nl = this.#buffer.indexOf('\n')) >= 0) {
      const line = this.#buffer.slice(0, nl).trim()
      this.#buffer = this.#buffer.slice(nl + 1)
      if (line === '') continue
      let msg: Record<string, unknown>
      try {
        msg = JSON.parse(line) as Record<string, unknown>
      } catch {
        continue
      }
      if (typeof msg.event === 'string') {
        this.emit('event', msg)
        continue
      }
      const waiter = this.#pending.shift()
      if (waiter === undefined) continue
      clearTimeout(waiter.timer)
      if (msg.ok === true) waiter.resolve(msg as ControlReply)
      else waiter.reject(new UigniterError('UIG_ERR_CONTROL_CHANNEL', `the guest refused the command: ${String(msg.error)}`))
    }
  }

  #failAll (err: Error): void {
    for (const p of this.#pending.splice(0)) {
      clearTimeout(p.timer)
      p.reject(err)
    }
  }
}
