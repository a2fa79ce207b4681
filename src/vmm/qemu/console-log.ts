import { ftruncateSync, readSync, watch, type FSWatcher } from 'node:fs'
import { open, rename, rm, stat, writeFile, type FileHandle } from 'node:fs/promises'
import { StringDecoder } from 'node:string_decoder'
import { hasErrno } from '../../core/errors.js'
import { tempSibling } from '../../core/fs-atomic.js'

export const DEFAULT_CONSOLE_LIMIT = 1024 * 1024

interface Follower {
  offset: number
  decoder: StringDecoder
  onData: (text: string) => void
}

/**
 * A VM's serial console log, which QEMU appends to (O_APPEND) whether or not
 * a daemon runs. It is kept within bounds by copy-and-truncate: QEMU holds
 * the file open, so it cannot be renamed away; `console.log.1` holds the
 * newest `limitBytes` of the previous part. Readers and the rotation take turns (one lock per log), so
 * a follower in this process sees every byte once, across rotations; only
 * what QEMU writes in the instant between the last copy and the truncate is
 * lost.
 */
export class ConsoleLog {
  readonly path: string
  readonly limitBytes: number
  readonly #followers = new Set<Follower>()
  readonly #pollMs: number
  #lock: Promise<unknown> = Promise.resolve()
  #watcher: FSWatcher | undefined
  #poller: NodeJS.Timeout | undefined
  #pumping: Promise<void> | undefined
  #again = false

  readonly #rotate: boolean

  /** `rotate`: also rotate whenever followers are woken by a write, not only when rotateIfNeeded() is called. */
  constructor (path: string, options: { limitBytes?: number, pollMs?: number, rotate?: boolean } = {}) {
    this.path = path
    this.limitBytes = options.limitBytes ?? DEFAULT_CONSOLE_LIMIT
    this.#pollMs = options.pollMs ?? 500
    this.#rotate = options.rotate ?? false
  }

  get previousPath (): string {
    return `${this.path}.1`
  }

  /** Moves the log to `.1` and empties it when it has grown past the limit; true if it did. */
  async rotateIfNeeded (): Promise<boolean> {
    return await this.#exclusive(async () => {
      let size: number
      try {
        size = (await stat(this.path)).size
      } catch (err) {
        if (hasErrno(err, 'ENOENT')) return false
        throw err
      }
      if (size <= this.limitBytes) return false
      const fh = await open(this.path, 'r+')
      let data: Buffer
      try {
        const copy = await readFrom(fh, 0)
        // What QEMU wrote while we copied, then the truncate, back to back on this thread: an
        // async call would hop through the thread pool in between, and a guest can write a
        // megabyte a second to its serial port.
        const late = readRestSync(fh.fd, copy.length)
        ftruncateSync(fh.fd, 0)
        data = late.length > 0 ? Buffer.concat([copy, late]) : copy
      } finally {
        await fh.close()
      }
      // Written after the truncate, from memory: a crash right here loses this part, which is
      // rarer than QEMU writing between a copy and a later truncate.
      const tmp = tempSibling(this.previousPath)
      try {
        // Only the newest `limitBytes`: past a burst the file can be far larger than the bound.
        await writeFile(tmp, data.subarray(Math.max(0, data.length - this.limitBytes)))
        await rename(tmp, this.previousPath)
      } finally {
        await rm(tmp, { force: true })
      }
      for (const f of this.#followers) {
        if (f.offset === Number.MAX_SAFE_INTEGER) continue
        if (f.offset < data.length) deliver(f, data.subarray(f.offset))
        f.offset = 0
      }
      return true
    })
  }

  /** The last `tailBytes` of the console (the previous part included), as text. */
  async read (options: { tailBytes?: number } = {}): Promise<string> {
    const tail = await this.#exclusive(async () => await this.#tail(options.tailBytes ?? 64 * 1024))
    return tail.buffer.toString('utf8')
  }

  /**
   * Calls `onData` with the console's output as it is written (tail -f,
   * across rotations), starting with its last `tailBytes` (Infinity: all of
   * it, the previous part included). Returns the function that stops it.
   */
  follow (onData: (text: string) => void, options: { tailBytes?: number } = {}): () => void {
    const follower: Follower = { offset: Number.MAX_SAFE_INTEGER, decoder: new StringDecoder('utf8'), onData }
    this.#followers.add(follower)
    this.#startWatching()
    const tailBytes = options.tailBytes ?? 0
    void this.#exclusive(async () => {
      const tail = await this.#tail(tailBytes)
      follower.offset = tail.currentSize
      if (tail.buffer.length > 0) deliver(follower, tail.buffer)
    }).catch(() => {}).then(() => this.poll())
    return () => {
      this.#followers.delete(follower)
      if (this.#followers.size === 0) this.#stopWatching()
    }
  }

  /**
   * Reads what is new for every follower now (also done on file changes and
   * every `pollMs`). Resolves after a read that began after this call.
   */
  async poll (): Promise<void> {
    this.#again = true
    this.#pumping ??= (async () => {
      try {
        while (this.#again) {
          this.#again = false
          await this.#exclusive(async () => await this.#pump())
          // A guest can write megabytes a second to its serial port: checking on every write keeps the bound close.
          if (this.#rotate) await this.rotateIfNeeded()
        }
      } finally {
        this.#pumping = undefined
      }
    })()
    await this.#pumping
  }

  /** Stops every follower and watcher; the file stays. */
  close (): void {
    this.#followers.clear()
    this.#stopWatching()
  }

  async #pump (): Promise<void> {
    if (this.#followers.size === 0) return
    let size: number
    try {
      size = (await stat(this.path)).size
    } catch {
      return
    }
    const fh = await open(this.path, 'r').catch(() => undefined)
    if (fh === undefined) return
    try {
      for (const f of this.#followers) {
        if (f.offset === Number.MAX_SAFE_INTEGER) continue
        // Shrunk without our rotation (another process rotated, or the VM restarted): start over.
        if (size < f.offset) f.offset = 0
        if (size === f.offset) continue
        const data = await readFrom(fh, f.offset, size - f.offset)
        f.offset += data.length
        deliver(f, data)
      }
    } finally {
      await fh.close()
    }
  }

  async #tail (tailBytes: number): Promise<{ buffer: Buffer, currentSize: number }> {
    const current = await readWhole(this.path)
    if (tailBytes <= current.length) return { buffer: current.subarray(current.length - tailBytes), currentSize: current.length }
    const previous = await readWhole(this.previousPath)
    const both = Buffer.concat([previous, current])
    return { buffer: both.subarray(Math.max(0, both.length - tailBytes)), currentSize: current.length }
  }

  #startWatching (): void {
    if (this.#poller !== undefined) return
    // The interval is the backstop: inotify does not see every writer (NFS, a missing file).
    this.#poller = setInterval(() => { void this.poll().catch(() => {}) }, this.#pollMs)
    this.#poller.unref()
    try {
      this.#watcher = watch(this.path, { persistent: false }, () => { void this.poll().catch(() => {}) })
      this.#watcher.on('error', () => { this.#watcher?.close(); this.#watcher = undefined })
    } catch {
      this.#watcher = undefined
    }
  }

  #stopWatching (): void {
    if (this.#poller !== undefined) clearInterval(this.#poller)
    this.#poller = undefined
    this.#watcher?.close()
    this.#watcher = undefined
  }

  async #exclusive<T> (fn: () => Promise<T>): Promise<T> {
    const run = this.#lock.then(fn, fn)
    this.#lock = run.catch(() => {})
    return await run
  }
}

function deliver (f: Follower, data: Buffer): void {
  const text = f.decoder.write(data)
  if (text !== '') f.onData(text)
}

async function readWhole (path: string): Promise<Buffer> {
  const fh = await open(path, 'r').catch((err: unknown) => {
    if (hasErrno(err, 'ENOENT')) return undefined
    throw err
  })
  if (fh === undefined) return Buffer.alloc(0)
  try {
    return await readFrom(fh, 0)
  } finally {
    await fh.close()
  }
}

/** Reads from `position` to the end of the file as it is now, or `length` bytes at most. */
async function readFrom (fh: FileHandle, position: number, length = Infinity): Promise<Buffer> {
  const chunks: Buffer[] = []
  let total = 0
  while (total < length) {
    const want = Math.min(256 * 1024, length - total)
    const buf = Buffer.alloc(want)
    const { bytesRead } = await fh.read(buf, 0, want, position + total)
    if (bytesRead === 0) break
    chunks.push(buf.subarray(0, bytesRead))
    total += bytesRead
  }
  return Buffer.concat(chunks)
}

function readRestSync (fd: number, position: number): Buffer {
  const chunks: Buffer[] = []
  for (let total = 0; ;) {
    const buf = Buffer.alloc(64 * 1024)
    const n = readSync(fd, buf, 0, buf.length, position + total)
    if (n === 0) break
    chunks.push(buf.subarray(0, n))
    total += n
  }
  return Buffer.concat(chunks)
}
