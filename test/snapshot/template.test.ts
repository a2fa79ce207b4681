import assert from 'node:assert/strict'
import { access, mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import { Template } from '../../src/snapshot/template.js'
import { chooseAccel } from '../../src/vmm/qemu/accel-probe.js'
import { freePort } from '../../src/core/free-port.js'
import { QemuDriver } from '../../src/vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../../src/vmm/qemu/qemu-vm.js'
import { VmStateDir } from '../../src/vmm/qemu/vm-state-dir.js'
import { rejectsWith } from '../helpers/assertions.js'
import { createTestContext, type TestContext } from '../helpers/fixtures.js'
import { tcpRead } from '../helpers/tcp-read.js'
import { makeIdentityRootfs } from './identity-app.js'
import { type Accel, type GuestLaunch, USER_NETWORK } from '../../src/core/ports/vmm-driver.js'
import { StepClock } from '../../src/core/start-steps.js'

function fields (line: string): Record<string, string> {
  return Object.fromEntries(line.split(' ').map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]))
}

/** Proportional set size in KiB, from /proc/PID/smaps_rollup. */
async function pssKiB (pid: number): Promise<number> {
  const m = /^Pss:\s+(\d+) kB/m.exec(await readFile(`/proc/${pid}/smaps_rollup`, 'utf8'))
  return Number(m?.[1] ?? NaN)
}

describe('templates and clones: real VMs', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let scratch: string
  let image: ImageManifest
  let accel: Accel
  let template: Template
  const driver = new QemuDriver({ livenessPollMs: 500, stopTimeouts: { guestMarginMs: 2000, quitMs: 2000, termMs: 2000, killMs: 3000 } })
  const started: QemuVm[] = []

  const launch = (): GuestLaunch => ({
    manifest: image,
    kernelPath: ctx.store.blobPath(image.kernel.blob.digest),
    rootfsPath: ctx.store.blobPath(image.rootfs?.digest ?? ''),
    accel,
    vcpus: 1,
    memoryMiB: 64,
    network: { mode: 'user', forwards: [] },
    guestNetwork: USER_NETWORK,
    hostname: 'template'
  })

  before(async () => {
    ctx = await createTestContext()
    scratch = await mkdtemp(join(tmpdir(), 'uigniter-snap-'))
    const root = await makeIdentityRootfs(scratch)
    image = await ctx.builder.build({ name: 'identity', source: { kind: 'rootfs', dir: root, entrypoint: '/bin/identity-app', args: [] }, format: 'squashfs' })
    accel = (await chooseAccel(ctx.config, ctx.store.blobPath(image.kernel.blob.digest), image.kernel.blob.digest)).accel
    template = await Template.create(driver, { id: 'identity', dataDir: ctx.dataDir, launch: launch() })
  })
  after(async () => {
    for (const vm of started) vm.kill()
    await Promise.all(started.map(async (vm) => await Promise.race([vm.exited, new Promise((resolve) => setTimeout(resolve, 3000))])))
    await template?.remove()
    await ctx.cleanup()
    await rm(scratch, { recursive: true, force: true })
  })

  test('a template holds its RAM in a file and a small state file; it can be opened again', async () => {
    const ram = await readFile(template.record.memoryPath).then((b) => b.length)
    assert.equal(ram, 64 * 1024 * 1024)
    const state = (await readFile(template.record.statePath)).length
    assert.ok(state > 0 && state < 1024 * 1024, `state.bin is ${state} bytes; the RAM must not be in it`)
    const again = await Template.open(ctx.dataDir, 'identity')
    assert.deepEqual(again.record, template.record)
    await rejectsWith(Template.open(ctx.dataDir, 'nope'), 'UIG_ERR_TEMPLATE_NOT_FOUND')
  })

  test('two clones answer through their own forwards with their own hostname, MAC, address, random bytes and env; faster and smaller than a boot', async () => {
    const clones: Array<{ line: Record<string, string>, raw: string, startMs: number, pid: number, mac: string }> = []
    for (const [i, address] of ['10.0.2.16', '10.0.2.17'].entries()) {
      const id = `clone${i}`
      const port = await freePort()
      const t0 = Date.now()
      const clock = new StepClock('clone')
      const { vm, identity } = await template.clone(driver, {
        id,
        stateDir: VmStateDir.of(ctx.dataDir, id).dir,
        network: { mode: 'user', forwards: [{ hostAddress: '127.0.0.1', hostPort: port, guestPort: 8080 }] },
        guestNetwork: { ...USER_NETWORK, address },
        hostname: `clone-${i}`,
        env: { CLONE_ENV: `value ${i}` }
      }, clock)
      started.push(vm)
      const steps = clock.timings().steps
      assert.deepEqual(steps.map((s) => s.name), ['spawn', 'restore', 'identity'], 'a clone runs its steps in order')
      const raw = (await tcpRead(port, 10_000, 5)).trim()
      const startMs = Date.now() - t0
      clones.push({ line: fields(raw), raw, startMs, pid: vm.pid, mac: identity.mac })
      process.stderr.write(`# clone ${id}: serving after ${startMs} ms (${steps.map((s) => `${s.name} ${s.ms}`).join(', ')} ms)\n`)
    }
    const [a, b] = clones
    assert.ok(a !== undefined && b !== undefined)
    assert.equal(a.line.host, 'clone-0')
    assert.equal(b.line.host, 'clone-1')
    assert.equal(a.line.ip, '10.0.2.16')
    assert.equal(b.line.ip, '10.0.2.17')
    assert.equal(a.line.mac, a.mac)
    assert.equal(b.line.mac, b.mac)
    assert.notEqual(a.line.mac, b.line.mac)
    assert.notEqual(a.line.rand, b.line.rand)
    // The environment came through the identity, percent-encoded on the way.
    assert.ok(a.raw.endsWith(' env=value 0'), a.raw)
    assert.ok(b.raw.endsWith(' env=value 1'), b.raw)
    assert.ok(clones.every((c) => c.line.rand !== undefined && /^[0-9a-f]{32}$/.test(c.line.rand)))

    // A cold boot of the same image, for the ratios.
    const port = await freePort()
    const t0 = Date.now()
    const cold = await driver.spawn({ id: 'cold', stateDir: VmStateDir.of(ctx.dataDir, 'cold').dir, launch: { ...launch(), hostname: 'cold', network: { mode: 'user', forwards: [{ hostAddress: '127.0.0.1', hostPort: port, guestPort: 8080 }] } } })
    started.push(cold)
    assert.equal(fields((await tcpRead(port, 60_000, 5)).trim()).host, 'cold')
    const coldMs = Date.now() - t0
    const clonePss = await pssKiB(a.pid)
    const coldPss = await pssKiB(cold.pid)
    process.stderr.write(`# start to serving: clones ${clones.map((c) => c.startMs).join(', ')} ms, cold boot ${coldMs} ms (ratio ${(coldMs / Math.max(...clones.map((c) => c.startMs))).toFixed(1)}x)\n`)
    process.stderr.write(`# PSS: clone ${clonePss} KiB, booted VM ${coldPss} KiB (${(100 * clonePss / coldPss).toFixed(0)} %)\n`)
  })

  test('a clone that does not take its identity in time is killed and reported, never returned', async () => {
    const id = 'late'
    const before = Date.now()
    await rejectsWith(template.clone(driver, {
      id,
      stateDir: VmStateDir.of(ctx.dataDir, id).dir,
      network: { mode: 'user', forwards: [] },
      guestNetwork: { ...USER_NETWORK, address: '10.0.2.18' },
      hostname: 'late',
      identityTimeoutMs: 1
    }), 'UIG_ERR_CLONE_IDENTITY')
    assert.ok(Date.now() - before < 10_000)
    const pid = await new VmStateDir(VmStateDir.of(ctx.dataDir, id).dir).readPid()
    const alive = pid !== undefined && await access(`/proc/${pid}`).then(() => true, () => false)
    assert.equal(alive, false, 'the clone\'s QEMU was killed')
  })
})
