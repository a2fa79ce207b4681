import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { access, readFile } from 'node:fs/promises'
import { join, posix } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { gunzipSync } from 'node:zlib'
import { httpGetWithRetry } from '../../src/core/app-probe.js'
import { DebianCloudKernel, type DebianCloudKernelInfo } from '../../src/guest/debian-cloud-kernel.js'
import { readElf } from '../../src/guest/elf-file.js'
import { BootedImage } from '../../src/vmm/qemu/image-boot.js'
import { rejectsWith } from '../helpers/assertions.js'
import { createTestContext, exampleSpec, packageRoot, type TestContext } from '../helpers/fixtures.js'

function packageInstalled (name: string): boolean {
  try {
    return execFileSync('dpkg-query', ['-W', '-f=${Status}', name], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().endsWith(' installed')
  } catch {
    return false
  }
}

const installed = packageInstalled('linux-image-cloud-amd64')

describe('kernel.source "debian-cloud": Debian\'s packaged cloud kernel', { skip: installed ? false : 'linux-image-cloud-amd64 is not installed (scripts/setup.sh installs it)' }, () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let kernel: DebianCloudKernelInfo

  before(async () => {
    // The shared cache dir of the configuration: the derived files are made once per machine.
    ctx = await createTestContext({ UIGNITER_KERNEL_SOURCE: 'debian-cloud' })
    kernel = await new DebianCloudKernel(ctx.config.cacheDir).get()
  })
  after(async () => { await ctx.cleanup() })

  test('the bzImage becomes a PVH vmlinux, and the virtio modules come in load order', { timeout: 180_000 }, async () => {
    assert.equal(kernel.source, 'debian-cloud')
    assert.ok((await readElf(kernel.path)).pvhEntry, `${kernel.path} should have a PVH entry note`)
    const names = kernel.modules.map((m) => posix.basename(m.guestPath, '.ko').replace(/-/g, '_'))
    for (const driver of ['virtio_pci', 'virtio_net', 'virtio_blk', 'virtio_console', 'virtio_rng']) {
      assert.ok(names.includes(driver) || kernel.builtin.includes(driver), `${driver} is loaded or built in`)
    }
    if (names.includes('virtio')) {
      assert.ok(names.indexOf('virtio') < names.indexOf('virtio_net'), 'virtio before virtio_net')
      assert.ok(names.indexOf('virtio_ring') < names.indexOf('virtio'), 'virtio_ring before virtio')
    }
    for (const m of kernel.modules) {
      await access(m.hostPath)
      assert.ok(m.guestPath.startsWith(`/lib/modules/${kernel.version}/`) && m.guestPath.endsWith('.ko'), m.guestPath)
    }
  })

  test('hello boots, answers HTTP and the control channel, and exits with code 0', { timeout: 180_000 }, async () => {
    const spec = JSON.parse(await readFile(exampleSpec('hello'), 'utf8')) as { memoryMiB: number }
    const manifest = await ctx.builder.build(spec, join(packageRoot, 'examples/hello'))
    assert.equal(manifest.kernel.source, 'debian-cloud')
    assert.equal(manifest.format, 'initramfs')
    assert.deepEqual(manifest.machine, { type: 'q35', transport: 'pci' })
    assert.equal(manifest.memoryMiB, spec.memoryMiB + kernel.extraMemoryMiB)

    // The modules are in the initramfs, and /uigniter/modules lists them in load order.
    const archive = gunzipSync(await readFile(ctx.store.blobPath(manifest.rootfs?.digest ?? '')))
    const files = execFileSync('cpio', ['-it', '--quiet'], { input: archive }).toString().split('\n')
    for (const m of kernel.modules) assert.ok(files.includes(m.guestPath.slice(1)), `${m.guestPath} is in the initramfs`)
    const list = execFileSync('cpio', ['-i', '--quiet', '--to-stdout', 'uigniter/modules'], { input: archive }).toString()
    assert.deepEqual(list.trim().split('\n'), kernel.modules.map((m) => m.guestPath))

    const booted = await BootedImage.start({ config: ctx.config, store: ctx.store, manifest, forwards: [{ hostPort: 0, guestPort: 8080 }] })
    const lines: string[] = []
    booted.on('line', (l: string) => lines.push(l))
    try {
      const answer = await httpGetWithRetry(booted.forwards[0]?.hostPort ?? 0, '/', 120_000)
      assert.equal(answer.status, 200)
      assert.match(answer.body, /Hello from uigniter! \(hello\)/)
      // The control channel is a virtio-console port: it answers only if virtio_console loaded.
      const status = await (await booted.control()).request('status')
      assert.equal(status.app, 'running')
      const exit = await booted.shutdown(3000)
      assert.equal(exit.reason, 'stopped', lines.join('\n'))
      assert.equal(exit.appExitCode, 0, 'the app exited on its own terms when asked to stop')
      assert.ok(!lines.some((l) => /uigniter-init: module /.test(l)), `every module loads:\n${lines.join('\n')}`)
    } finally {
      await booted.destroy()
    }
  })

  test('disk formats and microvm are refused: the disk driver is a module, and the kernel cannot find virtio-mmio devices', { timeout: 180_000 }, async () => {
    const hello = { kind: 'elf', path: 'build/examples/hello' }
    await rejectsWith(ctx.builder.build({ name: 'hello-disk', source: hello, format: 'squashfs' }, packageRoot), 'UIG_ERR_IMAGE_KERNEL_MISMATCH', 'squashfs')
    await rejectsWith(ctx.builder.build({ name: 'hello-mvm', source: hello, machine: { type: 'microvm', transport: 'mmio' } }, packageRoot), 'UIG_ERR_IMAGE_KERNEL_MISMATCH', 'microvm')
  })
})
