import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { waitForAppAnswer } from '../../src/core/app-probe.js'
import type { ImageManifest } from '../../src/core/image.js'
import { macForVm } from '../../src/core/mac-address.js'
import type { Accel } from '../../src/core/ports/vmm-driver.js'
import { HostNetwork, type VmNetwork } from '../../src/net/host-network.js'
import { Subnet } from '../../src/net/subnet.js'
import { sendIdentity, waitForIdentityWait } from '../../src/snapshot/guest-identity.js'
import { chooseAccel } from '../../src/vmm/qemu/accel-probe.js'
import { QemuDriver } from '../../src/vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../../src/vmm/qemu/qemu-vm.js'
import { VmStateDir } from '../../src/vmm/qemu/vm-state-dir.js'
import { createTestContext, type TestContext } from '../helpers/fixtures.js'
import { InMemoryIpAllocationStore } from '../net/in-memory-ip-allocation-store.js'
import { CleanupStack, freeSubnets, sh, testPrefix } from '../net/net-fixtures.js'
import { makeIdentityRootfs } from './identity-app.js'

/**
 * The real init taking an identity on a real bridge: a guest booted to its
 * wait for an identity (a template's boot) is heard announcing it, then
 * takes another address and MAC with its link up, and announces the new
 * pair itself: the host knows the new MAC before it sent the guest a single
 * packet. (Clones of a template are template.test.ts's.)
 */

interface Neighbour { dst: string, lladdr?: string, state?: string[] }

async function neighbourMac (ip: string, dev: string): Promise<string | undefined> {
  const entries = JSON.parse(await sh('ip', '-j', 'neigh', 'show', 'to', ip, 'dev', dev) || '[]') as Neighbour[]
  return entries.find((e) => e.dst === ip && e.lladdr !== undefined && e.state?.includes('FAILED') !== true)?.lladdr
}

describe('guest identity: real VM on a bridge', () => {
  const cleanup = new CleanupStack()
  const prefix = testPrefix()
  const bridge = `${prefix}br`
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let image: ImageManifest
  let accel: Accel
  let network: HostNetwork
  let booted: VmNetwork
  let vm: QemuVm
  const driver = new QemuDriver({ stopTimeouts: { guestMarginMs: 2000, quitMs: 2000, termMs: 2000, killMs: 3000 } })

  before(async () => {
    ctx = await createTestContext()
    cleanup.push(async () => await ctx.cleanup())
    const scratch = await mkdtemp(join(tmpdir(), 'uigniter-identity-'))
    cleanup.push(async () => await rm(scratch, { recursive: true, force: true }))
    image = await ctx.builder.build({ name: 'identity', source: { kind: 'rootfs', dir: await makeIdentityRootfs(scratch), entrypoint: '/bin/identity-app', args: [] }, format: 'squashfs' })
    accel = (await chooseAccel(ctx.config, ctx.store.blobPath(image.kernel.blob.digest), image.kernel.blob.digest)).accel
    const [cidr = ''] = await freeSubnets(1)
    network = new HostNetwork({ bridge, subnet: Subnet.parseForVms(cidr).cidr, nat: false, store: new InMemoryIpAllocationStore(), tapPrefix: prefix, firewallTable: prefix })
    cleanup.push(async () => await network.teardown())
    await network.setup()
    booted = await network.attach(`${prefix}-vm`)
    vm = await driver.spawn({
      id: 'waits',
      stateDir: VmStateDir.of(ctx.dataDir, 'waits').dir,
      launch: {
        manifest: image,
        kernelPath: ctx.store.blobPath(image.kernel.blob.digest),
        rootfsPath: ctx.store.blobPath(image.rootfs?.digest ?? ''),
        accel,
        vcpus: 1,
        memoryMiB: 64,
        network: { mode: 'tap', tap: booted.tap, mac: booted.mac },
        guestNetwork: { address: booted.ip, prefix: booted.prefix, gateway: booted.gateway },
        hostname: 'before',
        extraCmdline: ['uigniter.wait=identity']
      }
    })
    cleanup.push(async () => { vm.kill(); await vm.exited })
  })

  after(async () => await cleanup.run())

  test('the init announces its wait for an identity to every host connection', async () => {
    await vm.waitForMarker('init', 60_000)
    const socket = vm.controlSocket ?? ''
    await waitForIdentityWait(socket, 60_000)
    // A second host (a daemon restarted, a pool re-checking an instance) learns it too: from the announcement, or by asking after a grace.
    const t0 = performance.now()
    await waitForIdentityWait(socket, 10_000)
    process.stderr.write(`# a second connection heard the wait after ${(performance.now() - t0).toFixed(1)} ms\n`)
  })

  test('a new address and MAC, taken live, reach the host from the guest itself; the app then starts with them', async () => {
    const newIp = network.ipam.allocate(`${prefix}-second`)
    const newMac = macForVm(`${prefix}-second`)
    assert.equal(await neighbourMac(newIp, bridge), undefined, 'the host knows nothing of the new address yet')
    const taken = await sendIdentity(vm.controlSocket ?? '', {
      guestNetwork: { address: newIp, prefix: booted.prefix, gateway: booted.gateway },
      mac: newMac,
      hostname: 'after',
      env: { CLONE_ENV: 'taken live' }
    }, 10_000)
    assert.ok(taken.guestMs !== undefined && taken.guestMs >= 0, `the init timed its step: ${String(taken.guestMs)}`)
    process.stderr.write(`# identity step: ${taken.guestMs.toFixed(2)} ms in the guest\n`)
    // Nothing has been sent to the guest's new address: an entry means the guest told the host.
    const deadline = Date.now() + 5000
    let learnt: string | undefined
    while ((learnt = await neighbourMac(newIp, bridge)) === undefined && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50))
    assert.equal(learnt, newMac, 'the host learnt the new MAC from the guest\'s announcement')
    const fdb = await sh('bridge', 'fdb', 'show', 'br', bridge)
    assert.match(fdb, new RegExp(`^${newMac} dev ${booted.tap} `, 'm'), 'the bridge learnt which port the new MAC is on')
    const answer = await waitForAppAnswer({ host: newIp, port: 8080, speaksFirst: true }, 30_000)
    assert.match(answer.body, new RegExp(`^host=after mac=${newMac} ip=${newIp.replaceAll('.', '\\.')} rand=[0-9a-f]{32} env=taken live\\n$`))
    assert.match(await vm.readConsole(), /UIGNITER:IDENTITY hostname=after took_us=\d+/)
  })
})
