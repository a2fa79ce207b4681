import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { createWriteStream } from 'node:fs'
import { lstat, mkdir, readFile, readlink, truncate, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { test } from 'node:test'
import { promisify } from 'node:util'
import { createGzip, gunzipSync } from 'node:zlib'

import { CpioWriter } from '../../src/guest/cpio-writer.js'
import { rejectsWith, tempDir } from '../helpers/assertions.js'

const run = promisify(execFile)

/** A Writable that keeps everything written to it. */
class Collector extends Writable {
  readonly chunks: Buffer[] = []
  override _write (chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.chunks.push(chunk)
    callback()
  }

  get bytes (): Buffer {
    return Buffer.concat(this.chunks)
  }
}

interface Entry { offset: number; ino: number; mode: number; uid: number; gid: number; nlink: number; mtime: number; name: string; data: Buffer }

/** An independent reader of newc archives, to check fields cpio(1) does not show. */
function parseNewc (archive: Buffer): Entry[] {
  const entries: Entry[] = []
  let offset = 0
  for (;;) {
    assert.equal(offset % 4, 0, 'entries start on 4-byte boundaries')
    assert.equal(archive.toString('latin1', offset, offset + 6), '070701', `magic at ${offset}`)
    const field = (i: number): number => parseInt(archive.toString('latin1', offset + 6 + i * 8, offset + 14 + i * 8), 16)
    const nameSize = field(11)
    const size = field(6)
    const nameStart = offset + 110
    const dataStart = nameStart + nameSize + ((4 - ((110 + nameSize) % 4)) % 4)
    assert.equal(archive[nameStart + nameSize - 1], 0, 'names are NUL-terminated')
    const entry: Entry = {
      offset,
      ino: field(0),
      mode: field(1),
      uid: field(2),
      gid: field(3),
      nlink: field(4),
      mtime: field(5),
      name: archive.toString('utf8', nameStart, nameStart + nameSize - 1),
      data: archive.subarray(dataStart, dataStart + size)
    }
    entries.push(entry)
    offset = dataStart + size + ((4 - (size % 4)) % 4)
    if (entry.name === 'TRAILER!!!') break
  }
  assert.equal(offset, archive.length, 'nothing after the trailer')
  return entries
}

/** The same sequence of calls every time, for the reproducibility and layout checks. */
async function writeSample (output: Writable, hostFile: string): Promise<void> {
  const writer = new CpioWriter(output)
  await writer.addDirectory('/etc')
  await writer.addDirectory('usr', 0o755)
  await writer.addDirectory('usr/bin', 0o750)
  await writer.addFile('/usr/bin/app', { hostPath: hostFile }, 0o755)
  await writer.addFile('etc/config', { data: Buffer.from('key=value\n') }, 0o640)
  await writer.addFile('etc/empty', { data: Buffer.alloc(0) }, 0o600)
  await writer.addFile('etc/odd', { data: Buffer.from('abc') }, 0o4711)
  await writer.addSymlink('bin', 'usr/bin')
  await writer.addSymlink('/etc/link', '/etc/config')
  await writer.close()
}

void test('cpio -idm extracts what was written: contents, modes, link targets', async (t) => {
  const dir = await tempDir(t, 'uigniter-cpio-')
  // 1 MiB + 3 bytes: several read chunks, and a length that needs padding.
  const content = randomBytes(1024 * 1024 + 3)
  const hostFile = join(dir, 'app.bin')
  await writeFile(hostFile, content)

  const gzPath = join(dir, 'initramfs.cpio.gz')
  const gzip = createGzip()
  const done = pipeline(gzip, createWriteStream(gzPath))
  await writeSample(gzip, hostFile)
  await done

  const cpioPath = join(dir, 'initramfs.cpio')
  await writeFile(cpioPath, gunzipSync(await readFile(gzPath)))
  const out = join(dir, 'out')
  await mkdir(out)
  await run('sh', ['-c', 'umask 022 && cpio -idm --quiet < "$1"', 'sh', cpioPath], { cwd: out })

  const mode = async (path: string): Promise<number> => (await lstat(join(out, path))).mode & 0o7777
  assert.ok((await lstat(join(out, 'etc'))).isDirectory())
  assert.equal(await mode('etc'), 0o755)
  assert.equal(await mode('usr/bin'), 0o750)
  assert.deepEqual(await readFile(join(out, 'usr/bin/app')), content)
  assert.equal(await mode('usr/bin/app'), 0o755)
  assert.equal(await readFile(join(out, 'etc/config'), 'utf8'), 'key=value\n')
  assert.equal(await mode('etc/config'), 0o640)
  assert.equal((await readFile(join(out, 'etc/empty'))).length, 0)
  assert.equal(await mode('etc/empty'), 0o600)
  assert.equal(await readFile(join(out, 'etc/odd'), 'utf8'), 'abc')
  assert.equal(await mode('etc/odd'), 0o4711)
  assert.ok((await lstat(join(out, 'bin'))).isSymbolicLink())
  assert.equal(await readlink(join(out, 'bin')), 'usr/bin')
  assert.equal(await readlink(join(out, 'etc/link')), '/etc/config')
  assert.equal((await lstat(join(out, 'etc/config'))).mtimeMs, 0)
})

void test('the same input gives identical bytes, with the fixed header fields', async (t) => {
  const dir = await tempDir(t, 'uigniter-cpio-')
  const hostFile = join(dir, 'app.bin')
  await writeFile(hostFile, randomBytes(5000))

  const first = new Collector()
  await writeSample(first, hostFile)
  const second = new Collector()
  await writeSample(second, hostFile)
  assert.ok(first.bytes.equals(second.bytes), 'two runs differ')

  const entries = parseNewc(first.bytes)
  assert.deepEqual(entries.map((e) => e.name),
    ['etc', 'usr', 'usr/bin', 'usr/bin/app', 'etc/config', 'etc/empty', 'etc/odd', 'bin', 'etc/link', 'TRAILER!!!'])
  const files = entries.slice(0, -1)
  assert.equal(new Set(files.map((e) => e.ino)).size, files.length, 'inode numbers are unique')
  assert.ok(files.every((e) => e.ino > 0))
  for (const e of entries) {
    assert.equal(e.uid, 0)
    assert.equal(e.gid, 0)
    assert.equal(e.mtime, 0)
    assert.equal(e.nlink, (e.mode & 0o170000) === 0o040000 ? 2 : 1, e.name)
  }
  assert.equal(entries[0]?.mode, 0o040755)
  assert.equal(entries[3]?.mode, 0o100755)
  assert.equal(entries[7]?.mode, 0o120777)
  assert.equal(entries[7]?.data.toString(), 'usr/bin')
  assert.equal(first.bytes.length % 4, 0)
})

void test('backpressure: a slow stream never holds more than a chunk or so', async (t) => {
  const dir = await tempDir(t, 'uigniter-cpio-')
  const content = randomBytes(8 * 1024 * 1024)
  const hostFile = join(dir, 'big.bin')
  await writeFile(hostFile, content)

  let maxBuffered = 0
  const chunks: Buffer[] = []
  const slow = new Writable({
    highWaterMark: 1024,
    write (chunk: Buffer, _encoding, callback) {
      chunks.push(chunk)
      setImmediate(callback)
    }
  })
  const original = slow.write.bind(slow)
  slow.write = ((chunk: Buffer) => {
    const accepted = original(chunk)
    maxBuffered = Math.max(maxBuffered, slow.writableLength)
    return accepted
  }) as typeof slow.write

  const writer = new CpioWriter(slow)
  await writer.addFile('big', { hostPath: hostFile }, 0o644)
  await writer.close()
  // Without waiting for 'drain', all 8 MiB would be queued at once.
  assert.ok(maxBuffered <= 512 * 1024, `up to ${maxBuffered} bytes were buffered`)
  const entries = parseNewc(Buffer.concat(chunks))
  assert.ok(entries[0]?.data.equals(content))
})

void test('a file of 4 GiB or more is UIG_ERR_IMAGE_TOO_LARGE, and the archive stays usable', async (t) => {
  const dir = await tempDir(t, 'uigniter-cpio-')
  const huge = join(dir, 'huge')
  await writeFile(huge, '')
  await truncate(huge, 2 ** 32) // sparse: no disk used
  const output = new Collector()
  const writer = new CpioWriter(output)
  await rejectsWith(writer.addFile('huge', { hostPath: huge }, 0o644), 'UIG_ERR_IMAGE_TOO_LARGE', 'huge')
  await writer.addFile('small', { data: Buffer.from('ok') }, 0o644)
  await writer.close()
  assert.deepEqual(parseNewc(output.bytes).map((e) => e.name), ['small', 'TRAILER!!!'])
})

void test('bad inputs are rejected before anything is written', async (t) => {
  const dir = await tempDir(t, 'uigniter-cpio-')
  const output = new Collector()
  const writer = new CpioWriter(output)
  await rejectsWith(writer.addFile('a', { hostPath: join(dir, 'missing') }, 0o644), 'UIG_ERR_IMAGE_PATH_NOT_FOUND', join(dir, 'missing'))
  await rejectsWith(writer.addFile('a', { hostPath: dir }, 0o644), 'UIG_ERR_IMAGE_PATH_UNREADABLE', dir)
  for (const path of ['', '/', '//.', 'a/../b', '..']) {
    await rejectsWith(writer.addDirectory(path), 'UIG_ERR_IMAGE_SPEC_INVALID')
  }
  await rejectsWith(writer.addDirectory('d', 0o10000), 'UIG_ERR_IMAGE_SPEC_INVALID')
  await rejectsWith(writer.addFile('f', { data: Buffer.from('x') }, -1), 'UIG_ERR_IMAGE_SPEC_INVALID')
  await rejectsWith(writer.addSymlink('l', ''), 'UIG_ERR_IMAGE_SPEC_INVALID')
  assert.equal(output.bytes.length, 0)
})

void test('overlapping calls and calls after close() are refused', async () => {
  const writer = new CpioWriter(new Collector())
  const pending = writer.addDirectory('one')
  await assert.rejects(writer.addDirectory('two'), /await each call/)
  await pending
  await writer.close()
  await assert.rejects(writer.addDirectory('three'), /closed/)
  await assert.rejects(writer.close(), /closed/)
})

void test('an output stream error is reported by the writer instead of hanging', async () => {
  const failing = new Writable({
    highWaterMark: 16,
    write (_chunk, _encoding, callback) {
      setImmediate(() => { callback(new Error('disk on fire')) })
    }
  })
  const writer = new CpioWriter(failing)
  await assert.rejects(writer.addFile('f', { data: Buffer.alloc(1000) }, 0o644), /disk on fire/)
  await assert.rejects(writer.close(), /earlier write failed/)
})
