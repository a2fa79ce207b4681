import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { loadConfig } from '../../src/core/config.js'
import { httpGetWithRetry } from '../../src/core/app-probe.js'
import type { ImageManifest } from '../../src/core/image.js'
import { chooseAccel } from '../../src/vmm/qemu/accel-probe.js'
import { BootedImage } from '../../src/vmm/qemu/image-boot.js'
import { memcachedCommand } from '../helpers/memcached-text.js'
import { createTestContext, exampleSpec, packageRoot, runCli, type TestContext } from '../helpers/fixtures.js'

describe('booting images under QEMU', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let scratch: string
  const images: Record<string, ImageManifest> = {}
  const specOf = async (name: string): Promise<unknown> => JSON.parse(await readFile(exampleSpec(name), 'utf8'))

  before(async () => {
    ctx = await createTestContext()
    scratch = await mkdtemp(join(tmpdir(), 'uigniter-boot-'))
    images.hello = await ctx.builder.build(await specOf('hello'), join(packageRoot, 'examples/hello'))
    images.memcached = await ctx.builder.build(await specOf('memcached'), join(packageRoot, 'examples/memcached'))
  })
  after(async () => {
    await ctx.cleanup()
    await rm(scratch, { recursive: true, force: true })
  })

  test('uigniter image test: hello boots and answers HTTP through user-mode port forwarding', { timeout: 120_000 }, async () => {
    const { code, stdout, stderr } = await runCli(['image', 'test', 'hello', '--http', '8080'], { env: ctx.env })
    assert.equal(code, 0, stderr)
    assert.match(stdout, /hello: listening on :8080 as hello/)
    assert.match(stdout, /Hello from uigniter! \(hello\)/)
    assert.match(stderr, /app started/)
    assert.match(stderr, /app exited with code 0/, 'SIGTERM from the init lets hello exit cleanly')
  })

  test('the control channel reports status and shuts the app down gracefully', { timeout: 120_000 }, async () => {
    const booted = await BootedImage.start({ config: ctx.config, store: ctx.store, manifest: images.hello! })
    const lines: string[] = []
    booted.on('line', (l: string) => lines.push(l))
    try {
      const started = await booted.waitForMarker('app-started', 60_000)
      // The init reports the exec; wait until hello has set its SIGTERM handler and listens.
      await new Promise<void>((resolve) => {
        const check = (): void => { if (lines.some((l) => l.includes('hello: listening'))) resolve(); else booted.once('line', check) }
        check()
      })
      const status = await (await booted.control()).request('status')
      assert.equal(status.app, 'running')
      assert.equal(status.pid, started.kind === 'app-started' ? started.pid : -1)
      const exit = await booted.shutdown(3000)
      // A stop on request, in which the app exited on its own terms.
      assert.equal(exit.reason, 'stopped')
      assert.equal(exit.appExitCode, 0)
      assert.ok(lines.some((l) => l.includes('hello: stopping on SIGTERM')), lines.join('\n'))
    } finally {
      await booted.destroy()
    }
  })

  test('memcached from Debian answers "version" through a forwarded port', { timeout: 120_000 }, async () => {
    const booted = await BootedImage.start({ config: ctx.config, store: ctx.store, manifest: images.memcached!, forwards: [{ hostPort: 0, guestPort: 11211 }] })
    try {
      await booted.waitForMarker('app-started', 60_000)
      const reply = await memcachedCommand('127.0.0.1', booted.forwards[0]?.hostPort ?? 0, 'version\r\n')
      assert.match(reply, /^VERSION 1\.\d+\.\d+/)
    } finally {
      await booted.destroy()
    }
  })

  test('node-http on a shared squashfs disk answers HTTP', { timeout: 120_000 }, async () => {
    const manifest = await ctx.builder.build(await specOf('node-http'), join(packageRoot, 'examples/node-http'))
    assert.equal(manifest.format, 'squashfs')
    const booted = await BootedImage.start({ config: ctx.config, store: ctx.store, manifest, forwards: [{ hostPort: 0, guestPort: 8080 }] })
    try {
      const answer = await httpGetWithRetry(booted.forwards[0]?.hostPort ?? 0, '/x', 120_000)
      assert.equal(answer.status, 200)
      const body = JSON.parse(answer.body) as { hello: string, host: string, path: string }
      assert.deepEqual([body.hello, body.host, body.path], ['from uigniter', 'node-http', '/x'])
    } finally {
      await booted.destroy()
    }
  })

  test('a rootfs directory: the app\'s output and exit code come back to the host', { timeout: 120_000 }, async () => {
    const root = join(scratch, 'rootfs-exit')
    await mkdir(join(root, 'bin'), { recursive: true })
    await writeFile(join(scratch, 'exit3.c'), '#include <stdio.h>\n#include <stdlib.h>\nint main(int c, char **v) { printf("exit3: %s cwd-env=%s\\n", c > 1 ? v[1] : "-", getenv("GREETING")); return 3; }\n')
    execFileSync('gcc', ['-static', '-O2', '-o', join(root, 'bin/exit3'), join(scratch, 'exit3.c')])
    const manifest = await ctx.builder.build({ name: 'exit3', source: { kind: 'rootfs', dir: root, entrypoint: '/bin/exit3', args: ['from-args'] }, env: { GREETING: 'hi' } })
    const booted = await BootedImage.start({ config: ctx.config, store: ctx.store, manifest })
    const lines: string[] = []
    booted.on('line', (l: string) => lines.push(l))
    const exit = await booted.exited
    assert.equal(exit.reason, 'app-exited')
    assert.equal(exit.appExitCode, 3)
    assert.ok(lines.some((l) => l.includes('exit3: from-args cwd-env=hi')), lines.join('\n'))
  })

  test('an app that cannot be executed is reported as such', { timeout: 120_000 }, async () => {
    const root = join(scratch, 'rootfs-noexec')
    await mkdir(join(root, 'bin'), { recursive: true })
    await writeFile(join(root, 'bin/app'), 'no shebang, not an ELF\n')
    await chmod(join(root, 'bin/app'), 0o755)
    const manifest = await ctx.builder.build({ name: 'noexec', source: { kind: 'rootfs', dir: root, entrypoint: '/bin/app' } })
    const booted = await BootedImage.start({ config: ctx.config, store: ctx.store, manifest })
    await assert.rejects(booted.waitForMarker('app-started', 60_000), /could not be started|exec/)
    const exit = await booted.exited
    assert.equal(exit.reason, 'exec-failed')
  })

  test('bring your own kernel: booted as given, nothing injected', { timeout: 120_000 }, async () => {
    // Our own kernel and a squashfs of the hello image stand in for a unikernel and its disk.
    const disk = await ctx.builder.build({ name: 'hello-disk', source: { kind: 'elf', path: 'build/examples/hello' }, format: 'squashfs' }, packageRoot)
    const manifest = await ctx.builder.build({
      name: 'byo',
      source: {
        kind: 'unikernel',
        kernel: ctx.store.blobPath(disk.kernel.blob.digest),
        disk: ctx.store.blobPath(disk.rootfs?.digest ?? ''),
        cmdline: 'console=ttyS0 reboot=t panic=-1 root=/dev/vda ro rootfstype=squashfs init=/uigniter/init uigniter.hostname=byo'
      }
    })
    assert.equal(manifest.format, 'unikernel')
    assert.equal(manifest.init, null)
    const booted = await BootedImage.start({ config: ctx.config, store: ctx.store, manifest })
    try {
      const marker = await booted.waitForMarker('app-started', 60_000)
      assert.equal(marker.kind, 'app-started')
    } finally {
      await booted.destroy()
    }
  })

  test('acceleration: an explicit setting wins; auto gives a choice and its reason', { timeout: 120_000 }, async () => {
    const digest = images.hello!.kernel.blob.digest
    const kernel = ctx.store.blobPath(digest)
    assert.deepEqual((await chooseAccel(loadConfig({ ...ctx.env, UIGNITER_ACCEL: 'tcg' }), kernel, digest)).accel, 'tcg')
    const auto = await chooseAccel(loadConfig({ ...ctx.env, UIGNITER_ACCEL: 'auto' }), kernel, digest)
    assert.ok(auto.accel === 'kvm' || auto.accel === 'tcg')
    assert.ok(auto.reason.length > 10, auto.reason)
  })
})
