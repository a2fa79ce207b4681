import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { chmod, copyFile, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { ImageBuilder } from '../../src/guest/image-builder.js'
import { ImageStore } from '../../src/guest/image-store.js'
import { KernelCache } from '../../src/guest/kernel-cache.js'
import { rejectsWith } from '../helpers/assertions.js'
import { createTestContext, exampleSpec, packageRoot, runCli, type TestContext } from '../helpers/fixtures.js'

describe('image build', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let scratch: string
  before(async () => {
    ctx = await createTestContext()
    scratch = await mkdtemp(join(tmpdir(), 'uigniter-scratch-'))
  })
  after(async () => {
    await ctx.cleanup()
    await rm(scratch, { recursive: true, force: true })
  })

  test('the hello example becomes a small initramfs image with a complete manifest', { timeout: 180_000 }, async () => {
    const { code, stdout, stderr } = await runCli(['image', 'build', '-f', exampleSpec('hello'), '--json'], { env: ctx.env })
    assert.equal(code, 0, stderr)
    const manifest = JSON.parse(stdout) as Record<string, unknown>
    assert.equal(manifest.name, 'hello')
    assert.equal(manifest.tag, 'latest')
    assert.equal(manifest.format, 'initramfs')
    assert.deepEqual(manifest.entrypoint, ['/usr/bin/hello', '8080'])
    assert.deepEqual(manifest.ports, [{ port: 8080, protocol: 'http' }])
    assert.equal(manifest.memoryMiB, 64)
    assert.match(String(manifest.digest), /^sha256:[0-9a-f]{64}$/)
    const inspected = await runCli(['image', 'inspect', 'hello'], { env: ctx.env })
    assert.deepEqual({ ...JSON.parse(inspected.stdout) as object }, manifest)
    const ls = await runCli(['image', 'ls'], { env: ctx.env })
    assert.match(ls.stdout, /^hello\s+latest\s+[0-9a-f]{12}\s+initramfs/m)
  })

  test('the initramfs holds the init, the app, its libraries and nothing else', { timeout: 180_000 }, async () => {
    const manifest = await ctx.store.get('hello')
    assert.ok(manifest.rootfs !== undefined)
    const listing = execFileSync('sh', ['-c', `zcat '${ctx.store.blobPath(manifest.rootfs.digest)}' | cpio -t --quiet`]).toString().split('\n')
    for (const path of ['init', 'uigniter/config', 'usr/bin/hello', 'lib64/ld-linux-x86-64.so.2', 'lib/x86_64-linux-gnu/libc.so.6', 'etc/resolv.conf']) {
      assert.ok(listing.includes(path), `${path} in the initramfs`)
    }
    assert.ok(!listing.some((p) => /(^|\/)(sh|bash|busybox)$/.test(p)), 'no shell in the image')
  })

  test('the same build gives the same digest; a rebuild under another tag shares the blobs', { timeout: 180_000 }, async () => {
    const a = await ctx.store.get('hello')
    const b = await ctx.builder.build({ name: 'hello:again', source: { kind: 'elf', path: 'build/examples/hello', args: ['8080'] }, memoryMiB: 64, ports: [{ port: 8080, protocol: 'http' }] }, packageRoot)
    assert.equal(b.digest, a.digest)
    assert.deepEqual(b.rootfs, a.rootfs)
    await ctx.store.remove('hello:again')
    await stat(ctx.store.blobPath(a.rootfs?.digest ?? ''))
  })

  test('memcached from Debian: libraries resolved from the ELF', { timeout: 180_000 }, async () => {
    const m = await ctx.builder.build({ name: 'memcached', source: { kind: 'elf', path: '/usr/bin/memcached', args: ['-u', 'root'] } })
    assert.equal(m.format, 'initramfs')
    const listing = execFileSync('sh', ['-c', `zcat '${ctx.store.blobPath(m.rootfs?.digest ?? '')}' | cpio -t --quiet`]).toString()
    assert.match(listing, /libevent-2\.1\.so\.7/)
  })

  test('a large image becomes a squashfs disk, and ext4 when asked', { timeout: 180_000 }, async () => {
    const squash = await ctx.builder.build(await readSpec('node-http'), join(packageRoot, 'examples/node-http'))
    assert.equal(squash.format, 'squashfs')
    assert.match(squash.cmdline, /rootfstype=squashfs/)
    const ext4 = await ctx.builder.build({ name: 'hello-ext4', source: { kind: 'elf', path: 'build/examples/hello' }, format: 'ext4' }, packageRoot)
    assert.equal(ext4.format, 'ext4')
    const magic = execFileSync('blkid', ['-o', 'value', '-s', 'TYPE', ctx.store.blobPath(ext4.rootfs?.digest ?? '')]).toString().trim()
    assert.equal(magic, 'ext4')
  })

  test('image rm deletes the tag and the blobs nobody else uses', { timeout: 180_000 }, async () => {
    const m = await ctx.store.get('hello-ext4')
    await ctx.store.remove('hello-ext4')
    await rejectsWith(ctx.store.get('hello-ext4'), 'UIG_ERR_IMAGE_NOT_FOUND')
    // gc keeps blobs younger than a minute (a concurrent build may be about to commit them)
    assert.ok(m.rootfs !== undefined)
    const cli = await runCli(['image', 'rm', 'nope'], { env: ctx.env })
    assert.equal(cli.code, 1)
    assert.match(cli.stderr, /UIG_ERR_IMAGE_NOT_FOUND/)
  })

  describe('bad input', () => {
    test('not an ELF', { timeout: 180_000 }, async () => {
      const path = join(scratch, 'notes.txt')
      await writeFile(path, 'just text\n')
      await chmod(path, 0o755)
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'elf', path } }), 'UIG_ERR_IMAGE_NOT_ELF')
    })

    test('a shared library that cannot be found', { timeout: 180_000 }, async () => {
      const dir = join(scratch, 'missing-lib')
      await mkdir(dir, { recursive: true })
      await writeFile(join(dir, 'lib.c'), 'int answer(void) { return 42; }\n')
      await writeFile(join(dir, 'app.c'), 'int answer(void);\nint main(void) { return answer(); }\n')
      execFileSync('gcc', ['-shared', '-fPIC', '-o', join(dir, 'libanswer.so'), join(dir, 'lib.c')])
      execFileSync('gcc', ['-o', join(dir, 'app'), join(dir, 'app.c'), `-L${dir}`, '-lanswer'])
      await rm(join(dir, 'libanswer.so'))
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'elf', path: join(dir, 'app') } }), 'UIG_ERR_IMAGE_LIBRARY_NOT_FOUND', 'libanswer.so')
    })

    test('a missing path', { timeout: 180_000 }, async () => {
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'elf', path: join(scratch, 'nope') } }), 'UIG_ERR_IMAGE_PATH_NOT_FOUND')
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'node', dir: join(scratch, 'nope'), entry: 'a.js' } }), 'UIG_ERR_IMAGE_PATH_NOT_FOUND')
      const cli = await runCli(['image', 'build', '-f', join(scratch, 'no-spec.json')], { env: ctx.env })
      assert.match(cli.stderr, /UIG_ERR_IMAGE_PATH_NOT_FOUND/)
    })

    test('an unreadable path (the CLI run as nobody)', { timeout: 180_000 }, async () => {
      const secretDir = await mkdtemp(join(tmpdir(), 'uigniter-unreadable-'))
      try {
        await chmod(secretDir, 0o755)
        await copyFile('/usr/bin/memcached', join(secretDir, 'memcached'))
        await chmod(join(secretDir, 'memcached'), 0o700)
        const dataDir = join(secretDir, 'data')
        await mkdir(dataDir)
        await chmod(dataDir, 0o777)
        const cli = await runCli(['image', 'build', '--elf', join(secretDir, 'memcached'), '-t', 'x'],
          { env: { ...ctx.env, UIGNITER_DATA_DIR: dataDir, UIGNITER_CACHE_DIR: ctx.config.cacheDir }, uid: 65534 })
        assert.equal(cli.code, 1, cli.stderr)
        assert.match(cli.stderr, /UIG_ERR_IMAGE_PATH_UNREADABLE/)
      } finally {
        await rm(secretDir, { recursive: true, force: true })
      }
    })

    test('a directory without its entrypoint', { timeout: 180_000 }, async () => {
      const root = join(scratch, 'rootfs')
      await mkdir(join(root, 'bin'), { recursive: true })
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'rootfs', dir: root, entrypoint: '/bin/app' } }), 'UIG_ERR_IMAGE_NO_ENTRYPOINT')
      await writeFile(join(root, 'bin/app'), 'data')
      await chmod(join(root, 'bin/app'), 0o644)
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'rootfs', dir: root, entrypoint: '/bin/app' } }), 'UIG_ERR_IMAGE_NO_ENTRYPOINT')
      const app = join(scratch, 'node-app')
      await mkdir(app, { recursive: true })
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'node', dir: app, entry: 'server.js' } }), 'UIG_ERR_IMAGE_NO_ENTRYPOINT')
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'node', dir: app, entry: '../server.js' } }), 'UIG_ERR_IMAGE_NO_ENTRYPOINT')
    })

    test('an invalid name or tag', { timeout: 180_000 }, async () => {
      await rejectsWith(ctx.builder.build({ name: 'Bad Name', source: { kind: 'elf', path: '/usr/bin/memcached' } }), 'UIG_ERR_IMAGE_INVALID_NAME')
      const cli = await runCli(['image', 'build', '--elf', '/usr/bin/memcached', '-t', 'ok:bad:tag!'], { env: ctx.env })
      assert.equal(cli.code, 1)
      assert.match(cli.stderr, /UIG_ERR_IMAGE_INVALID_NAME/)
    })

    test('a spec with a wrong field names the field', { timeout: 180_000 }, async () => {
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'elf', path: '/usr/bin/memcached' }, memoryMiB: 'lots' }), 'UIG_ERR_IMAGE_SPEC_INVALID', 'memoryMiB')
      const cli = await runCli(['image', 'build', '--elf', '/usr/bin/memcached', '--cpus', 'two'], { env: ctx.env })
      assert.equal(cli.code, 2)
      assert.match(cli.stderr, /UIG_ERR_CLI_USAGE/)
    })

    test('a kernel file that is not bootable', { timeout: 180_000 }, async () => {
      const text = join(scratch, 'kernel.txt')
      await writeFile(text, 'not a kernel')
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'unikernel', kernel: text } }), 'UIG_ERR_KERNEL_NOT_BOOTABLE')
      // A real ELF, but an ordinary program: no PVH entry note.
      await rejectsWith(ctx.builder.build({ name: 'x', source: { kind: 'unikernel', kernel: '/usr/bin/memcached' } }), 'UIG_ERR_KERNEL_NOT_BOOTABLE')
    })

    test('no space left: a clear error and nothing left behind', { timeout: 180_000 }, async () => {
      const small = await mkdtemp(join(tmpdir(), 'uigniter-full-'))
      try {
        execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', small])
        const builder = new ImageBuilder(new ImageStore(small), new KernelCache(ctx.config.cacheDir))
        await rejectsWith(builder.build({ name: 'too-big', source: { kind: 'elf', path: '/usr/bin/memcached' }, format: 'ext4' }), 'UIG_ERR_NO_SPACE')
        await rejectsWith(builder.build({ name: 'too-big', source: { kind: 'elf', path: '/usr/bin/memcached' } }), 'UIG_ERR_NO_SPACE')
        const leftovers = await readdir(join(small, 'images'), { recursive: true })
        assert.deepEqual(leftovers.filter((p) => !['tmp', 'blobs', 'blobs/sha256'].includes(p)), [], 'no half-written blob, manifest or ref')
      } finally {
        execFileSync('umount', [small])
        await rm(small, { recursive: true, force: true })
      }
    })
  })
})

async function readSpec (name: string): Promise<unknown> {
  return JSON.parse(await readFile(exampleSpec(name), 'utf8'))
}
