import assert from 'node:assert/strict'
import { execFile, execFileSync } from 'node:child_process'
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { test } from 'node:test'
import { promisify } from 'node:util'
import { gzipSync } from 'node:zlib'

import { extractVmlinux } from '../../src/guest/bzimage.js'
import { rejectsWith, tempDir } from '../helpers/assertions.js'

const run = promisify(execFile)

/** A small static ELF standing in for vmlinux; with `pvh`, it carries the Xen PHYS32_ENTRY note (type 18). */
async function fakeKernel (dir: string, pvh: boolean): Promise<Buffer> {
  const source = join(dir, `kernel-${pvh}.c`)
  const binary = join(dir, `kernel-${pvh}`)
  const note = pvh
    ? '__asm__(".pushsection .note.Xen, \\"a\\", @note\\n.balign 4\\n.long 4\\n.long 4\\n.long 18\\n.asciz \\"Xen\\"\\n.balign 4\\n.long 0x1000000\\n.popsection\\n");\n'
    : ''
  await writeFile(source, `${note}int main(void) { return 0; }\n`)
  await run('gcc', ['-static', '-o', binary, source])
  return await readFile(binary)
}

/**
 * A bzImage as the x86 boot protocol lays it out: one setup sector after the
 * boot sector, the "HdrS" header, and the payload `payloadOffset` bytes into
 * the protected-mode code, with the kernel's size trailer unless it is gzip.
 */
function fakeBzImage (payload: Buffer, options: { sizeTrailer?: number } = {}): Buffer {
  const setupSectors = 1
  const payloadOffset = 0x40
  const trailer = Buffer.alloc(options.sizeTrailer === undefined ? 0 : 4)
  if (options.sizeTrailer !== undefined) trailer.writeUInt32LE(options.sizeTrailer)
  const body = Buffer.concat([payload, trailer])
  const image = Buffer.alloc((setupSectors + 1) * 512 + payloadOffset + body.length)
  image.writeUInt8(setupSectors, 0x1f1)
  image.write('HdrS', 0x202, 'latin1')
  image.writeUInt16LE(0x020f, 0x206)
  image.writeUInt32LE(payloadOffset, 0x248)
  image.writeUInt32LE(body.length, 0x24c)
  body.copy(image, (setupSectors + 1) * 512 + payloadOffset)
  return image
}

const compressors: Array<[string, (b: Buffer) => Buffer]> = [
  ['gzip', (b) => gzipSync(b)],
  ['xz', (b) => execFileSync('xz', ['-c', '--check=crc32'], { input: b })],
  ['zstd', (b) => execFileSync('zstd', ['-c', '-q'], { input: b })],
  // -l: the legacy frame format the kernel's lz4 payloads use.
  ['lz4', (b) => execFileSync('lz4', ['-l', '-c', '-q'], { input: b })]
]

for (const [format, compress] of compressors) {
  void test(`a ${format} payload is extracted byte for byte and checked for its PVH note`, async (t) => {
    const dir = await tempDir(t)
    const kernel = await fakeKernel(dir, true)
    const bz = join(dir, 'vmlinuz')
    await writeFile(bz, fakeBzImage(compress(kernel), format === 'gzip' ? {} : { sizeTrailer: kernel.length }))
    const { compression } = await extractVmlinux(bz, join(dir, 'vmlinux'))
    assert.equal(compression, format)
    assert.ok((await readFile(join(dir, 'vmlinux'))).equals(kernel))
  })
}

void test('what cannot become a PVH vmlinux is UIG_ERR_KERNEL_NOT_BOOTABLE, with the reason', async (t) => {
  const dir = await tempDir(t)
  const out = join(dir, 'vmlinux')
  const write = async (name: string, bytes: Buffer): Promise<string> => { await writeFile(join(dir, name), bytes); return join(dir, name) }
  await rejectsWith(extractVmlinux('/bin/true', out), 'UIG_ERR_KERNEL_NOT_BOOTABLE', 'not a bzImage')
  const kernel = await fakeKernel(dir, true)
  await rejectsWith(extractVmlinux(await write('odd', fakeBzImage(Buffer.from('not compressed at all'))), out), 'UIG_ERR_KERNEL_NOT_BOOTABLE', 'unknown payload compression')
  const xz = execFileSync('xz', ['-c'], { input: kernel })
  await rejectsWith(extractVmlinux(await write('short', fakeBzImage(xz, { sizeTrailer: kernel.length + 1 })), out), 'UIG_ERR_KERNEL_NOT_BOOTABLE', `expected ${kernel.length + 1}`)
  const plain = await fakeKernel(dir, false)
  await rejectsWith(extractVmlinux(await write('nopvh', fakeBzImage(gzipSync(plain))), out), 'UIG_ERR_KERNEL_NOT_BOOTABLE', 'PVH')
})
