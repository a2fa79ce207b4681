/**
 * Writes a cpio archive in the "newc" format (magic 070701), the format the
 * Linux kernel unpacks into rootfs at boot when it is given an initramfs.
 *
 * The output is reproducible: the same calls give the same bytes, because
 * every header field that would carry host state (inode, owner, time, device)
 * is fixed or derived from the order of the calls.
 */

import { constants as fsConstants } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { finished } from 'node:stream/promises'
import type { Writable } from 'node:stream'

import { UigniterError, hasErrno } from '../core/errors.js'

const MAGIC = '070701'
const HEADER_SIZE = 110
const S_IFDIR = 0o040000
const S_IFREG = 0o100000
const S_IFLNK = 0o120000
// newc stores sizes as 8 hex digits.
const MAX_FIELD = 0xffffffff
// The kernel's initramfs unpacker drops names and symlink targets longer than PATH_MAX.
const PATH_MAX = 4096
// Large enough that reading a 100 MB file takes few syscalls, small enough
// that backpressure keeps memory use bounded.
const CHUNK_SIZE = 256 * 1024

/** Where the content of a regular file comes from. */
export type CpioFileSource = { hostPath: string } | { data: Buffer }

interface EntryHeader {
  name: string
  mode: number
  nlink: number
  size: number
}

/**
 * Streams a cpio "newc" archive to a Writable (typically a gzip stream piped
 * to a file). Entries are written in call order, with uid/gid 0, mtime 0 and
 * inode numbers counting up from 1, so identical calls give identical bytes.
 *
 * Every method is async and must be awaited before the next one is called:
 * a call made while another is still running is rejected. Parent directories
 * are not created implicitly; add them before their contents, as the kernel
 * does not create missing parents when it unpacks the archive. Paths may be
 * given with or without a leading slash; it is removed in the archive.
 *
 * Validation and input-file errors (bad path or mode, missing or unreadable
 * source, file too large) are thrown before anything is written, so the
 * archive stays usable. An error while an entry's data is being written
 * (output stream failure, a source file that shrank) leaves the archive
 * broken, and every later call is rejected.
 */
export class CpioWriter {
  private nextInode = 1
  private busy = false
  private closed = false
  private broken: unknown = undefined

  /**
   * @param output - the stream to write to; it is ended by {@link CpioWriter.close}.
   *   An error it emits is reported by the pending or next call (ultimately
   *   `close()`) instead of crashing the process as an unhandled 'error' event.
   */
  constructor (private readonly output: Writable) {
    output.on('error', () => {})
  }

  /**
   * Adds a directory.
   * @param path - the directory's path in the archive.
   * @param mode - permission bits (0 to 0o7777).
   */
  async addDirectory (path: string, mode = 0o755): Promise<void> {
    await this.exclusive(async () => {
      const name = archivePath(path)
      await this.writeEntry({ name, mode: S_IFDIR | checkMode(mode), nlink: 2, size: 0 }, Buffer.alloc(0))
    })
  }

  /**
   * Adds a regular file whose content is a buffer or a host file. A host file
   * is streamed in chunks, so its size does not matter for memory use.
   * @param path - the file's path in the archive.
   * @param source - `{ data }` for content in memory, `{ hostPath }` to copy a file (symlinks followed).
   * @param mode - permission bits (0 to 0o7777).
   * @throws UigniterError UIG_ERR_IMAGE_TOO_LARGE when the content is 4 GiB or more;
   *   UIG_ERR_IMAGE_PATH_NOT_FOUND / UIG_ERR_IMAGE_PATH_UNREADABLE for a host file
   *   that is missing, unreadable or not a regular file.
   */
  async addFile (path: string, source: CpioFileSource, mode: number): Promise<void> {
    await this.exclusive(async () => {
      const name = archivePath(path)
      const fileMode = S_IFREG | checkMode(mode)
      if ('data' in source) {
        checkSize(source.data.length, name)
        await this.writeEntry({ name, mode: fileMode, nlink: 1, size: source.data.length }, source.data)
        return
      }
      const { handle, size } = await openSource(source.hostPath)
      try {
        checkSize(size, name)
        await this.writeHeader({ name, mode: fileMode, nlink: 1, size })
        await this.guard(async () => {
          await this.copyFrom(handle, source.hostPath, size)
          await this.write(padding(size))
        })
      } finally {
        await handle.close()
      }
    })
  }

  /**
   * Adds a symbolic link; as in any cpio archive, its data is the target.
   * @param path - the link's path in the archive.
   * @param target - what the link points to, stored as given.
   */
  async addSymlink (path: string, target: string): Promise<void> {
    await this.exclusive(async () => {
      const name = archivePath(path)
      const data = Buffer.from(target, 'utf8')
      if (data.length === 0 || data.length >= PATH_MAX || data.includes(0)) {
        throw new UigniterError('UIG_ERR_IMAGE_SPEC_INVALID', `the symlink target for ${name} must be 1 to ${PATH_MAX - 1} bytes without NUL`)
      }
      await this.writeEntry({ name, mode: S_IFLNK | 0o777, nlink: 1, size: data.length }, data)
    })
  }

  /**
   * Writes the `TRAILER!!!` entry that ends the archive, ends the output
   * stream and waits until it has taken all the data.
   */
  async close (): Promise<void> {
    await this.exclusive(async () => {
      // The trailer is a plain entry with inode 0, like the one GNU cpio and the kernel's gen_init_cpio write.
      await this.guard(async () => {
        await this.write(header({ name: 'TRAILER!!!', mode: 0, nlink: 1, size: 0 }, 0))
        this.closed = true
        this.output.end()
        await finished(this.output, { readable: false })
      })
    })
  }

  /** Rejects overlapping, late or post-failure calls, which would interleave or corrupt entries. */
  private async exclusive (operation: () => Promise<void>): Promise<void> {
    if (this.broken !== undefined) throw new Error('CpioWriter: an earlier write failed; the archive is incomplete', { cause: this.broken })
    if (this.closed) throw new Error('CpioWriter: the archive is already closed')
    if (this.busy) throw new Error('CpioWriter: the previous call has not finished; await each call before the next')
    this.busy = true
    try {
      await operation()
    } finally {
      this.busy = false
    }
  }

  /** Runs a step that writes to the output; if it fails, the archive is left with a partial entry. */
  private async guard (step: () => Promise<void>): Promise<void> {
    try {
      await step()
    } catch (err) {
      this.broken = err
      throw err
    }
  }

  private async writeEntry (entry: EntryHeader, data: Buffer): Promise<void> {
    await this.guard(async () => {
      await this.write(header(entry, this.nextInode++))
      if (data.length > 0) await this.write(data)
      await this.write(padding(data.length))
    })
  }

  private async writeHeader (entry: EntryHeader): Promise<void> {
    await this.guard(async () => {
      await this.write(header(entry, this.nextInode++))
    })
  }

  /** Streams exactly `size` bytes; the header already announced that size, so a shorter file is an error. */
  private async copyFrom (handle: FileHandle, hostPath: string, size: number): Promise<void> {
    let position = 0
    while (position < size) {
      // A fresh buffer per chunk: the stream may still hold the previous one.
      const chunk = Buffer.allocUnsafe(Math.min(CHUNK_SIZE, size - position))
      const { bytesRead } = await handle.read(chunk, 0, chunk.length, position)
      if (bytesRead === 0) {
        throw new UigniterError('UIG_ERR_IMAGE_PATH_UNREADABLE', `${hostPath} shrank while it was being added to the image`)
      }
      await this.write(chunk.subarray(0, bytesRead))
      position += bytesRead
    }
  }

  /** Writes a chunk and, when the stream's buffer is full, waits for 'drain' before returning. */
  private async write (chunk: Buffer): Promise<void> {
    if (chunk.length === 0) return
    const output = this.output
    if (output.destroyed || output.writableEnded) {
      throw output.errored ?? new Error('CpioWriter: the output stream was closed before the archive was complete')
    }
    if (output.write(chunk)) return
    await new Promise<void>((resolve, reject) => {
      const cleanup = (): void => {
        output.off('drain', onDrain)
        output.off('error', onError)
        output.off('close', onClose)
      }
      const onDrain = (): void => { cleanup(); resolve() }
      const onError = (err: Error): void => { cleanup(); reject(err) }
      // A stream destroyed without an error never drains; do not wait forever.
      const onClose = (): void => {
        cleanup()
        reject(output.errored ?? new Error('CpioWriter: the output stream was closed before the archive was complete'))
      }
      output.on('drain', onDrain)
      output.on('error', onError)
      output.on('close', onClose)
    })
  }
}

/** Builds the 110-byte header plus the NUL-terminated name, padded to 4 bytes. */
function header (entry: EntryHeader, inode: number): Buffer {
  const name = Buffer.from(entry.name, 'utf8')
  const fields = [
    inode,
    entry.mode,
    0, // uid
    0, // gid
    entry.nlink,
    0, // mtime: fixed so that builds are reproducible
    entry.size,
    0, // devmajor
    0, // devminor
    0, // rdevmajor
    0, // rdevminor
    name.length + 1, // namesize, including the NUL
    0 // check: only used by the "crc" variant (070702)
  ]
  const text = MAGIC + fields.map((value) => value.toString(16).toUpperCase().padStart(8, '0')).join('')
  const total = HEADER_SIZE + name.length + 1
  const out = Buffer.alloc(total + padLength(total))
  out.write(text, 0, 'latin1')
  name.copy(out, HEADER_SIZE)
  return out
}

function padLength (length: number): number {
  return (4 - (length % 4)) % 4
}

function padding (length: number): Buffer {
  return Buffer.alloc(padLength(length))
}

/** Normalises an archive path: no leading slash, no empty, `.` or `..` components. */
function archivePath (path: string): string {
  const parts = path.split('/').filter((part) => part !== '' && part !== '.')
  const name = parts.join('/')
  if (name === '' || parts.includes('..') || name.includes('\0')) {
    throw new UigniterError('UIG_ERR_IMAGE_SPEC_INVALID', `"${path}" is not a valid path inside the image`)
  }
  if (Buffer.byteLength(name, 'utf8') >= PATH_MAX) {
    throw new UigniterError('UIG_ERR_IMAGE_SPEC_INVALID', `the path ${name.slice(0, 64)}... is too long for the image`)
  }
  return name
}

function checkMode (mode: number): number {
  if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777) {
    throw new UigniterError('UIG_ERR_IMAGE_SPEC_INVALID', `mode ${String(mode)} is not a permission mode between 0 and 0o7777`)
  }
  return mode
}

function checkSize (size: number, name: string): void {
  if (size > MAX_FIELD) {
    throw new UigniterError('UIG_ERR_IMAGE_TOO_LARGE',
      `${name} is ${size} bytes; a cpio newc archive holds files up to ${MAX_FIELD} bytes (4 GiB - 1)`)
  }
}

/**
 * Opens a host file to copy. O_NONBLOCK keeps a FIFO from blocking open(2);
 * the fstat check then rejects it along with directories and devices.
 */
async function openSource (hostPath: string): Promise<{ handle: FileHandle; size: number }> {
  let handle: FileHandle
  try {
    handle = await open(hostPath, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK)
  } catch (err) {
    if (hasErrno(err, 'ENOENT', 'ENOTDIR')) {
      throw new UigniterError('UIG_ERR_IMAGE_PATH_NOT_FOUND', `${hostPath} does not exist`, { cause: err })
    }
    if (hasErrno(err, 'EACCES', 'EPERM', 'EISDIR', 'ELOOP')) {
      throw new UigniterError('UIG_ERR_IMAGE_PATH_UNREADABLE', `${hostPath} cannot be read: ${(err as Error).message}`, { cause: err })
    }
    throw err
  }
  const stats = await handle.stat().catch(async (err: unknown) => {
    await handle.close()
    throw err
  })
  if (!stats.isFile()) {
    await handle.close()
    throw new UigniterError('UIG_ERR_IMAGE_PATH_UNREADABLE', `${hostPath} is not a regular file`)
  }
  return { handle, size: stats.size }
}
