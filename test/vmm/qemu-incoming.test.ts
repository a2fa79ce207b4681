import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import { type Accel, type GuestLaunch, USER_NETWORK } from '../../src/core/ports/vmm-driver.js'
import { chooseAccel } from '../../src/vmm/qemu/accel-probe.js'
import { QemuDriver } from '../../src/vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../../src/vmm/qemu/qemu-vm.js'
import { VmStateDir } from '../../src/vmm/qemu/vm-state-dir.js'
import { createTestContext, type TestContext } from '../helpers/fixtures.js'
import { makeProbeRootfs } from './probe-app.js'

/**
 * A VM spawned to restore a saved state (a clone) must not self-announce:
 * QEMU's default after an incoming migration is five rounds of gratuitous
 * ARPs of the restored (the template's) address and MAC, each flooded to
 * every VM on the bridge. A VM that boots keeps QEMU's default.
 */
describe('QEMU driver: a VM spawned for a restore', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let scratch: string
  let image: ImageManifest
  let accel: Accel
  const driver = new QemuDriver()
  const started: QemuVm[] = []

  const launch = (over: Partial<GuestLaunch> = {}): GuestLaunch => ({
    manifest: image,
    kernelPath: ctx.store.blobPath(image.kernel.blob.digest),
    rootfsPath: ctx.store.blobPath(image.rootfs?.digest ?? ''),
    accel,
    vcpus: 1,
    memoryMiB: 64,
    network: { mode: 'user', forwards: [] },
    guestNetwork: USER_NETWORK,
    ...over
  })

  before(async () => {
    ctx = await createTestContext()
    scratch = await mkdtemp(join(tmpdir(), 'uigniter-incoming-'))
    image = await ctx.builder.build({ name: 'probe', source: { kind: 'rootfs', dir: await makeProbeRootfs(scratch), entrypoint: '/bin/probe', args: ['serve'] }, format: 'squashfs' })
    accel = (await chooseAccel(ctx.config, ctx.store.blobPath(image.kernel.blob.digest), image.kernel.blob.digest)).accel
  })
  after(async () => {
    for (const vm of started) vm.kill()
    await Promise.all(started.map(async (vm) => await vm.exited))
    await ctx.cleanup()
    await rm(scratch, { recursive: true, force: true })
  })

  test('announces nothing after its restore; a booted VM keeps QEMU\'s announce rounds', async () => {
    const clone = await driver.spawn({ id: 'restores', stateDir: VmStateDir.of(ctx.dataDir, 'restores').dir, launch: launch({ incoming: 'defer' }) })
    started.push(clone)
    const booted = await driver.spawn({ id: 'boots', stateDir: VmStateDir.of(ctx.dataDir, 'boots').dir, launch: launch({ startPaused: true }) })
    started.push(booted)
    const rounds = async (vm: QemuVm): Promise<unknown> => (await vm.monitor<Record<string, unknown>>('query-migrate-parameters'))['announce-rounds']
    assert.equal(await rounds(clone), 0)
    assert.notEqual(await rounds(booted), 0)
  })
})
