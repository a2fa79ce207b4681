import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { chmod, copyFile, open, readFile, truncate, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { test } from 'node:test'
import { promisify } from 'node:util'

import { UigniterError } from '../../src/core/errors.js'
import { loadConfig } from '../../src/core/config.js'
import { isBzImage, readElf } from '../../src/guest/elf-file.js'
import { KernelCache } from '../../src/guest/kernel-cache.js'
import { rejectsWith, tempDir } from '../helpers/assertions.js'

const run = promisify(execFile)

/** A copy of /bin/true with some bytes overwritten, for crafting ELF files the toolchain will not produce. */
async function patchedTrue (dir: string, name: string, patches: Array<[offset: number, bytes: number[]]>): Promise<string> {
  const bytes = await readFile('/bin/true')
  for (const [offset, values] of patches) Buffer.from(values).copy(bytes, offset)
  const path = join(dir, name)
  await writeFile(path, bytes)
  return path
}

/** Compiles a C program whose PT_NOTE segment carries a note named "Xen" of the given type. */
async function compileWithXenNote (dir: string, type: number): Promise<string> {
  const source = join(dir, `note-${type}.c`)
  const binary = join(dir, `note-${type}`)
  // Laid out like the kernel's ELFNOTE() macro: namesz, descsz, type, "Xen\0", desc.
  await writeFile(source, `
__asm__(".pushsection .note.Xen, \\"a\\", @note\\n"
        ".balign 4\\n"
        ".long 4\\n.long 4\\n.long ${type}\\n"
        ".asciz \\"Xen\\"\\n"
        ".balign 4\\n"
        ".long 0x1000000\\n"
        ".popsection\\n");
int main(void) { return 0; }
`)
  await run('gcc', ['-o', binary, source])
  return binary
}

void test('memcached: a PIE executable with its interpreter and libraries', async () => {
  const info = await readElf('/usr/bin/memcached')
  assert.equal(info.machine, 'x86_64')
  assert.equal(info.type, 'dyn')
  assert.equal(info.interpreter, '/lib64/ld-linux-x86-64.so.2')
  assert.ok(info.needed.includes('libc.so.6'), info.needed.join(','))
  assert.ok(info.needed.some((name) => name.startsWith('libevent')), info.needed.join(','))
  assert.equal(info.soname, undefined)
  assert.equal(info.pvhEntry, false)
})

void test('the node binary (~100 MB) parses', async () => {
  const info = await readElf(process.execPath)
  assert.equal(info.machine, 'x86_64')
  assert.ok(info.interpreter?.startsWith('/lib'), String(info.interpreter))
  assert.ok(info.needed.includes('libc.so.6'), info.needed.join(','))
})

void test('only the needed ranges are read: a 3 GiB file (too big for one Buffer) parses', async (t) => {
  const path = join(await tempDir(t, 'uigniter-elf-'), 'huge')
  await copyFile('/bin/true', path)
  // Sparse, so it costs no disk; readFile() on it would fail with ERR_FS_FILE_TOO_LARGE.
  await truncate(path, 3 * 1024 ** 3)
  const info = await readElf(path)
  assert.deepEqual(info.needed, ['libc.so.6'])
})

void test('/bin/true needs exactly libc', async () => {
  const info = await readElf('/bin/true')
  assert.deepEqual(info.needed, ['libc.so.6'])
  assert.deepEqual(info.rpath, [])
  assert.deepEqual(info.runpath, [])
  assert.equal(info.interpreter, '/lib64/ld-linux-x86-64.so.2')
})

void test('a static executable has no interpreter and no needed libraries', async (t) => {
  const dir = await tempDir(t, 'uigniter-elf-')
  await writeFile(join(dir, 'static.c'), 'int main(void) { return 0; }\n')
  await run('gcc', ['-static', '-o', join(dir, 'static'), join(dir, 'static.c')])
  const info = await readElf(join(dir, 'static'))
  assert.equal(info.type, 'exec')
  assert.equal(info.interpreter, undefined)
  assert.deepEqual(info.needed, [])
})

void test('a shared library: soname, needed, RPATH and RUNPATH', async (t) => {
  const dir = await tempDir(t, 'uigniter-elf-')
  const source = join(dir, 'lib.c')
  await writeFile(source, '#include <math.h>\ndouble f(double x) { return sqrt(x); }\n')
  await run('gcc', ['-shared', '-fPIC', '-o', join(dir, 'librp.so'), source, '-lm',
    '-Wl,-soname,librp.so.3', '-Wl,--disable-new-dtags', '-Wl,-rpath,$ORIGIN/a:/opt/b'])
  await run('gcc', ['-shared', '-fPIC', '-o', join(dir, 'librun.so'), source, '-lm',
    '-Wl,--enable-new-dtags', '-Wl,-rpath,${ORIGIN}/../lib'])

  const rp = await readElf(join(dir, 'librp.so'))
  assert.equal(rp.type, 'dyn')
  assert.equal(rp.soname, 'librp.so.3')
  assert.deepEqual(rp.rpath, ['$ORIGIN/a', '/opt/b'])
  assert.deepEqual(rp.runpath, [])
  assert.ok(rp.needed.includes('libm.so.6'), rp.needed.join(','))
  assert.equal(rp.interpreter, undefined)

  const run2 = await readElf(join(dir, 'librun.so'))
  assert.equal(run2.soname, undefined)
  assert.deepEqual(run2.rpath, [])
  assert.deepEqual(run2.runpath, ['${ORIGIN}/../lib'])
})

void test('the Xen PHYS32_ENTRY note (type 18) sets pvhEntry; another type does not', async (t) => {
  const dir = await tempDir(t, 'uigniter-elf-')
  assert.equal((await readElf(await compileWithXenNote(dir, 18))).pvhEntry, true)
  assert.equal((await readElf(await compileWithXenNote(dir, 17))).pvhEntry, false)
})

void test('a text file is NOT_ELF and the message names it', async (t) => {
  const path = join(await tempDir(t, 'uigniter-elf-'), 'script.sh')
  await writeFile(path, '#!/bin/sh\necho this is not an ELF file but it is long enough to hold a header\n')
  await rejectsWith(readElf(path), 'UIG_ERR_IMAGE_NOT_ELF', path)
})

void test('an empty file and a file cut inside the ELF header are NOT_ELF', async (t) => {
  const dir = await tempDir(t, 'uigniter-elf-')
  const bytes = await readFile('/bin/true')
  for (const length of [0, 3, 18, 40]) {
    const path = join(dir, `cut-${length}`)
    await writeFile(path, bytes.subarray(0, length))
    await rejectsWith(readElf(path), 'UIG_ERR_IMAGE_NOT_ELF', path)
  }
})

void test('an ELF cut inside its program headers or segments is NOT_ELF', async (t) => {
  const dir = await tempDir(t, 'uigniter-elf-')
  const bytes = await readFile('/bin/true')
  for (const length of [100, 1000, Math.floor(bytes.length / 2), bytes.length - 1]) {
    const path = join(dir, `cut-${length}`)
    await writeFile(path, bytes.subarray(0, length))
    await rejectsWith(readElf(path), 'UIG_ERR_IMAGE_NOT_ELF', path, 'truncated')
  }
})

void test('valid ELF files for other machines, classes or byte orders are UNSUPPORTED_ELF', async (t) => {
  const dir = await tempDir(t, 'uigniter-elf-')
  // e_machine (offset 18, little-endian) = 183 (EM_AARCH64)
  await rejectsWith(readElf(await patchedTrue(dir, 'aarch64', [[18, [183, 0]]])), 'UIG_ERR_IMAGE_UNSUPPORTED_ELF', 'AArch64')
  // EI_CLASS = ELFCLASS32 and e_machine = 3 (EM_386)
  await rejectsWith(readElf(await patchedTrue(dir, 'i386', [[4, [1]], [18, [3, 0]]])), 'UIG_ERR_IMAGE_UNSUPPORTED_ELF', '32-bit', 'i386')
  // EI_DATA = ELFDATA2MSB
  await rejectsWith(readElf(await patchedTrue(dir, 'msb', [[5, [2]]])), 'UIG_ERR_IMAGE_UNSUPPORTED_ELF', 'big-endian')
  // An invalid class byte is not an ELF file we can name at all.
  await rejectsWith(readElf(await patchedTrue(dir, 'class9', [[4, [9]]])), 'UIG_ERR_IMAGE_NOT_ELF')
})

void test('missing files, directories and FIFOs get path errors, not parse errors', async (t) => {
  const dir = await tempDir(t, 'uigniter-elf-')
  await rejectsWith(readElf(join(dir, 'missing')), 'UIG_ERR_IMAGE_PATH_NOT_FOUND', join(dir, 'missing'))
  await rejectsWith(readElf(join(dir, 'missing', 'below')), 'UIG_ERR_IMAGE_PATH_NOT_FOUND')
  await rejectsWith(readElf(dir), 'UIG_ERR_IMAGE_PATH_UNREADABLE', dir)

  // Opening a FIFO nobody writes to blocks (unless O_NONBLOCK is used); if
  // that happens, become the writer so the test fails instead of hanging.
  const fifo = join(dir, 'fifo')
  await run('mkfifo', [fifo])
  const attempt = readElf(fifo)
  let timer: NodeJS.Timeout | undefined
  const hung = await Promise.race([
    attempt.then(() => false, () => false),
    new Promise<boolean>((resolve) => { timer = setTimeout(() => { resolve(true) }, 5000) })
  ])
  clearTimeout(timer)
  if (hung) {
    await (await open(fifo, 'w')).close()
    await attempt.catch(() => {})
    assert.fail('readElf blocked opening a FIFO')
  }
  await rejectsWith(attempt, 'UIG_ERR_IMAGE_PATH_UNREADABLE', 'not a regular file')
})

void test('a file without read permission is PATH_UNREADABLE', { skip: process.getuid?.() === 0 ? 'root can read any file' : false }, async (t) => {
  const path = join(await tempDir(t, 'uigniter-elf-'), 'secret')
  await copyFile('/bin/true', path)
  await chmod(path, 0o000)
  await rejectsWith(readElf(path), 'UIG_ERR_IMAGE_PATH_UNREADABLE', path)
})

void test('corrupted headers give UigniterErrors or a result, never a crash', async (t) => {
  const dir = await tempDir(t, 'uigniter-elf-')
  const original = await readFile('/bin/true')
  // A fixed-seed generator, so a failure reproduces.
  let seed = 0x5eed
  const random = (limit: number): number => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0
    return (seed >>> 8) % limit
  }
  const path = join(dir, 'mutant')
  let parsed = 0
  for (let i = 0; i < 400; i++) {
    const bytes = Buffer.from(original)
    const flips = 1 + random(6)
    for (let j = 0; j < flips; j++) {
      // Mostly the ELF and program headers, sometimes anywhere (dynamic section, notes, strings).
      const position = random(4) === 0 ? random(bytes.length) : 16 + random(64 + 14 * 56 - 16)
      bytes[position] = random(256)
    }
    await writeFile(path, bytes)
    try {
      await readElf(path)
      parsed++
    } catch (err) {
      assert.ok(err instanceof UigniterError, `mutant ${i} threw ${String(err)}`)
      assert.ok(err.code === 'UIG_ERR_IMAGE_NOT_ELF' || err.code === 'UIG_ERR_IMAGE_UNSUPPORTED_ELF', err.message)
    }
  }
  // Most single-byte changes hit fields that do not matter; if nothing parsed, the parser is too strict.
  assert.ok(parsed > 0)
})

void test('isBzImage looks for "HdrS" at 0x202', async (t) => {
  const dir = await tempDir(t, 'uigniter-elf-')
  const image = Buffer.alloc(2048)
  image.write('HdrS', 0x202, 'latin1')
  await writeFile(join(dir, 'bzImage'), image)
  assert.equal(await isBzImage(join(dir, 'bzImage')), true)

  const shifted = Buffer.alloc(2048)
  shifted.write('HdrS', 0x200, 'latin1')
  await writeFile(join(dir, 'shifted'), shifted)
  assert.equal(await isBzImage(join(dir, 'shifted')), false)

  await writeFile(join(dir, 'short'), image.subarray(0, 0x204))
  assert.equal(await isBzImage(join(dir, 'short')), false)
  assert.equal(await isBzImage('/bin/true'), false)
  await rejectsWith(isBzImage(join(dir, 'missing')), 'UIG_ERR_IMAGE_PATH_NOT_FOUND')
  await rejectsWith(isBzImage(dir), 'UIG_ERR_IMAGE_PATH_UNREADABLE')
})

test('our guest kernel: linked above 2^53, and bootable by PVH', async () => {
  const kernel = await new KernelCache(loadConfig().cacheDir).get()
  const info = await readElf(kernel.path)
  assert.equal(info.type, 'exec')
  assert.equal(info.pvhEntry, true)
})
