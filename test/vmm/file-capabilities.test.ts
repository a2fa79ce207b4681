import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { chmod, copyFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { after, before, describe, test } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import type { Accel, GuestLaunch } from '../../src/core/ports/vmm-driver.js'
import { chooseAccel } from '../../src/vmm/qemu/accel-probe.js'
import { QemuDriver } from '../../src/vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../../src/vmm/qemu/qemu-vm.js'
import { VmStateDir } from '../../src/vmm/qemu/vm-state-dir.js'
import { BUSYBOX } from '../helpers/busybox-guests.js'
import { consoleLine, consoleLines } from '../helpers/guest-console.js'
import { createTestContext, type TestContext } from '../helpers/fixtures.js'

/**
 * File capabilities in a real guest. A pulled image keeps `security.capability`
 * on its disk (test/oci/disk-owners-capabilities.test.ts reads it back on the
 * host); here the guest kernel honours it. The app runs as uid 1000, and a
 * copy of busybox with cap_net_bind_service+ep gets that capability (and
 * binds port 80) where plain busybox gets none. Every file is root's, as in
 * most images: the capability is kept all the same. On a squashfs root
 * through the writable overlay, as a pulled image boots, and on an ext4
 * root. Needs root (setcap), as the suite does.
 */

const root = process.getuid?.() === 0
const run = promisify(execFile)

/** cap_net_bind_service is capability 10. */
const NET_BIND_SERVICE = (1n << 10n).toString(16).padStart(16, '0')

const APP = `#!/bin/busybox sh
export PATH=/bin
echo "UIG-ID $(busybox id -u):$(busybox id -g)"
echo "UIG-PLAIN $(busybox grep CapEff /proc/self/status)"
echo "UIG-CAPABLE $(/cap/busybox grep CapEff /proc/self/status 2>&1)"
if /cap/busybox nc -l -p 80 -w 1 127.0.0.1 2>/tmp/e; then :; fi
echo "UIG-BIND80 $(busybox cat /tmp/e)"
if busybox nc -l -p 81 -w 1 127.0.0.1 2>/tmp/e; then :; fi
echo "UIG-BIND81 $(busybox cat /tmp/e)"
echo UIG-READY
exec busybox sleep 3600
`

describe('file capabilities in a real guest', { skip: root ? false : 'needs root (setcap)' }, () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let scratch: string
  let accel: Accel
  const images: Record<'squashfs' | 'ext4', ImageManifest | undefined> = { squashfs: undefined, ext4: undefined }
  const driver = new QemuDriver({ livenessPollMs: 500, stopTimeouts: { guestMarginMs: 3000, quitMs: 2000, termMs: 2000, killMs: 3000 } })
  const started: QemuVm[] = []

  before(async () => {
    ctx = await createTestContext()
    scratch = await mkdtemp(join(tmpdir(), 'uigniter-caps-'))
    const tree = join(scratch, 'tree')
    await mkdir(join(tree, 'bin'), { recursive: true })
    await mkdir(join(tree, 'tmp'))
    await copyFile(BUSYBOX, join(tree, 'bin/busybox'))
    // Named busybox, so that busybox takes its first argument as the applet.
    await mkdir(join(tree, 'cap'))
    await copyFile(BUSYBOX, join(tree, 'cap/busybox'))
    await chmod(join(tree, 'bin/busybox'), 0o755)
    await chmod(join(tree, 'cap/busybox'), 0o755)
    await run('setcap', ['cap_net_bind_service+ep', join(tree, 'cap/busybox')])
    await writeFile(join(tree, 'app.sh'), APP, { mode: 0o755 })
    for (const format of ['squashfs', 'ext4'] as const) {
      images[format] = await ctx.builder.build({
        name: `caps-${format}`,
        source: { kind: 'rootfs', dir: tree, entrypoint: '/app.sh', owners: 'keep' },
        format,
        user: { uid: 1000, gid: 1000 }
      })
    }
    const image = images.squashfs as ImageManifest
    accel = (await chooseAccel(ctx.config, ctx.store.blobPath(image.kernel.blob.digest), image.kernel.blob.digest)).accel
  })
  after(async () => {
    for (const vm of started) vm.kill()
    await Promise.all(started.map(async (vm) => await Promise.race([vm.exited, new Promise((resolve) => setTimeout(resolve, 3000))])))
    await ctx?.cleanup()
    if (scratch !== undefined) await rm(scratch, { recursive: true, force: true })
  })

  for (const [format, overlaySizeMiB] of [['squashfs', 64], ['ext4', undefined]] as const) {
    test(`${format}${overlaySizeMiB !== undefined ? ' with the overlay' : ''}: an app running as uid 1000 gets a file's capability, and only from that file`, { timeout: 120_000 }, async () => {
      const image = images[format] as ImageManifest
      const id = `caps-${format}`
      const launch: GuestLaunch = {
        manifest: image,
        kernelPath: ctx.store.blobPath(image.kernel.blob.digest),
        rootfsPath: ctx.store.blobPath(image.rootfs?.digest ?? ''),
        accel,
        vcpus: 1,
        memoryMiB: 64,
        network: { mode: 'none' },
        ...(overlaySizeMiB !== undefined ? { overlaySizeMiB } : {})
      }
      const vm = await driver.spawn({ id, stateDir: VmStateDir.of(ctx.dataDir, id).dir, launch })
      started.push(vm)
      await consoleLine(vm, /^UIG-READY$/)
      const out = await consoleLines(vm)
      const line = (tag: string): string => out.find((l) => l.startsWith(`${tag} `))?.slice(tag.length + 1) ?? `(no ${tag} line)\n${out.join('\n')}`
      assert.equal(line('UIG-ID'), '1000:1000')
      assert.equal(line('UIG-PLAIN'), 'CapEff:\t0000000000000000')
      assert.equal(line('UIG-CAPABLE'), `CapEff:\t${NET_BIND_SERVICE}`)
      assert.doesNotMatch(line('UIG-BIND80'), /denied|not permitted/i, 'the capable copy may bind port 80')
      assert.match(line('UIG-BIND81'), /Permission denied/, 'plain busybox, as uid 1000, may not bind port 81')
      assert.equal((await vm.stop({ graceMs: 5000 })).reason, 'stopped')
    })
  }
})
