import assert from 'node:assert/strict'
import { after, before, describe, it } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import { run } from '../../src/core/exec.js'
import { freePort } from '../../src/core/free-port.js'
import type { ServiceStatus } from '../../src/core/service.js'
import type { Vm } from '../../src/core/vm.js'
import type { Volume } from '../../src/core/volume.js'
import { rejectsWith } from '../helpers/assertions.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { closeDebianLayout, pushDebianImage, REDIS_PORT } from '../helpers/debian-image.js'
import { createTestContext, runCli, type TestContext } from '../helpers/fixtures.js'
import { startRegistry, type TestRegistry } from '../helpers/oci-registry.js'
import { redisCommand } from '../helpers/redis-resp.js'

/**
 * A stateful service: Debian's redis-server, pulled from a real registry
 * as an image, with `appendfsync always` (a write is acknowledged once it
 * is fsynced) and one volume per replica. What was acknowledged must
 * survive a kill -9 of the replica's QEMU (a power cut, then the
 * replacement takes the same index and so the same volume), a rolling
 * update (the old replica stops before the new one takes the volume) and
 * a daemon restart. One replica at a time: three boots in all.
 */
describe('redis with a per-replica volume, through the gateway', { timeout: 900_000 }, () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let registry: TestRegistry
  let daemon: DaemonProcess
  let kvPort: number
  let image: string
  const VOLUME = 'kv-data-0'

  const spec = (env: Record<string, string> = {}): Record<string, unknown> => ({
    image,
    ports: [{ port: REDIS_PORT, protocol: 'tcp', gatewayPort: kvPort }],
    resources: { memoryMiB: 256 },
    env,
    volumes: [{ name: 'data', guestPath: '/data', perReplica: true, sizeMiB: 64 }],
    healthCheck: { type: 'tcp', intervalMs: 500, timeoutMs: 2000, unhealthyThreshold: 4 },
    drainTimeoutMs: 1000
  })

  async function ready (check: (s: ServiceStatus) => boolean = () => true, timeoutMs = 180_000): Promise<ServiceStatus> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const status = await daemon.api.call<ServiceStatus>('GET', '/v1/services/kv')
      const healthy = status.endpoints.filter((e) => e.health === 'healthy')
      if (healthy.length === 1 && status.endpoints.length === 1 && check(status)) return status
      if (Date.now() > deadline) throw new Error(`kv was not ready in time: ${JSON.stringify({ ...status, spec: undefined })}\n${daemon.output.slice(-2000)}`)
      await sleep(200)
    }
  }
  const redis = async (...args: string[]): Promise<string | number | null> => await redisCommand('127.0.0.1', kvPort, args)
  async function keysAreThere (n: number, why: string): Promise<void> {
    for (let i = 0; i < n; i++) assert.equal(await redis('GET', `key-${i}`), `value-${i}`, `key-${i} ${why}`)
  }
  async function replicaVm (): Promise<Vm> {
    const endpoint = (await daemon.api.call<ServiceStatus>('GET', '/v1/services/kv')).endpoints[0]
    assert.ok(endpoint?.vm !== null && endpoint?.vm !== undefined)
    return await daemon.api.call<Vm>('GET', `/v1/vms/${endpoint.vm}`)
  }

  before(async () => {
    ctx = await createTestContext()
    registry = await startRegistry()
    const ref = await pushDebianImage(registry, 'redis')
    const pulled = await runCli(['image', 'pull', '--insecure', ref, '-t', 'redis:test'], { env: ctx.env })
    assert.equal(pulled.code, 0, pulled.stderr)
    image = 'redis:test'
    kvPort = await freePort()
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.237.${Math.floor(Math.random() * 200)}.0/24` })
    await daemon.start()
  })

  after(async () => {
    await daemon?.removeEverything()
    await registry?.close()
    await closeDebianLayout()
    await ctx?.cleanup()
  })

  it('writes acknowledged before a kill -9 of the replica are read from its replacement, which takes the same volume', async () => {
    await daemon.api.call('PUT', '/v1/services/kv', spec())
    await ready()
    const first = await replicaVm()
    assert.equal(first.service?.index, 0)
    assert.match(first.name, /^kv-0-[0-9a-f]{6}$/)
    assert.deepEqual(first.volumes, [{ name: VOLUME, guestPath: '/data', readOnly: false }])
    const volume = await daemon.api.call<Volume>('GET', `/v1/volumes/${VOLUME}`)
    assert.deepEqual(volume.service, { name: 'kv', volume: 'data', index: 0 })
    assert.deepEqual(volume.attachments.map((a) => a.vmName), [first.name])

    for (let i = 0; i < 50; i++) assert.equal(await redis('SET', `key-${i}`, `value-${i}`), 'OK')
    // The power cut: QEMU dies at once, with no flush but the ones the guest asked for.
    assert.ok(first.pid !== null)
    process.kill(first.pid, 'SIGKILL')
    const back = await ready((s) => s.endpoints[0]?.vm !== first.name)
    const second = await replicaVm()
    assert.equal(second.service?.index, 0, 'the replacement takes the index, and so the volume')
    assert.notEqual(second.name, first.name)
    assert.equal(back.endpoints.length, 1)
    await keysAreThere(50, 'was acknowledged (fsynced) before the kill -9')
  })

  it('refuses to delete the attached volume or to attach it to a second VM', async () => {
    await rejectsWith(daemon.api.call('DELETE', `/v1/volumes/${VOLUME}`), 'UIG_ERR_VOLUME_IN_USE', 'kv-0-')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { image, volumes: [{ name: VOLUME, guestPath: '/data' }] }), 'UIG_ERR_VOLUME_IN_USE', 'one VM only')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { image, volumes: [{ name: VOLUME, guestPath: '/data', readOnly: true }] }), 'UIG_ERR_VOLUME_IN_USE', 'read-write')
    // A service naming a clone start path with volumes: its clones would share the template's disk.
    await rejectsWith(daemon.api.call('PUT', '/v1/services/kv2', { ...spec(), startPath: 'clone', ports: [{ port: REDIS_PORT, protocol: 'tcp', gatewayPort: await freePort() }] }),
      'UIG_ERR_VOLUME_TEMPLATE', 'startPath: cold')
    const vms = await daemon.api.call<Vm[]>('GET', '/v1/vms')
    assert.equal(vms.filter((vm) => vm.state === 'running').length, 1, 'no refused VM was started')
  })

  it('keeps the keys through a rolling update: the old replica stops before the new one takes the volume', async () => {
    const before = await replicaVm()
    await daemon.api.call('PUT', '/v1/services/kv', spec({ ROLLOUT: '2' }))
    await ready((s) => s.endpoints[0]?.generation === 2)
    const after = await replicaVm()
    assert.notEqual(after.name, before.name)
    assert.equal(after.service?.generation, 2)
    assert.equal(after.service?.index, 0)
    await keysAreThere(50, 'was written before the rollout')
    assert.equal(await redis('SET', 'after-rollout', 'yes'), 'OK')
  })

  it('keeps serving the keys across a daemon restart, the replica adopted with its volume', async () => {
    const before = await replicaVm()
    await daemon.stop()
    await daemon.start()
    await ready()
    const after = await replicaVm()
    assert.equal(after.id, before.id, 'adopted, not replaced')
    assert.deepEqual((await daemon.api.call<Volume>('GET', `/v1/volumes/${VOLUME}`)).attachments.map((a) => a.vm), [after.id])
    await keysAreThere(50, 'was written before the restart')
    assert.equal(await redis('GET', 'after-rollout'), 'yes')
  })

  it('outlives the service: deleted, the replica stops gracefully and leaves a clean filesystem, which can then be removed', async () => {
    await daemon.api.call('DELETE', '/v1/services/kv')
    const deadline = Date.now() + 60_000
    let volume = await daemon.api.call<Volume>('GET', `/v1/volumes/${VOLUME}`)
    while (volume.attachments.length > 0 && Date.now() < deadline) {
      await sleep(200)
      volume = await daemon.api.call<Volume>('GET', `/v1/volumes/${VOLUME}`)
    }
    assert.deepEqual(volume.attachments, [])
    assert.ok(volume.allocatedBytes > 0 && volume.allocatedBytes < 64 * 1024 * 1024, `sparse: ${volume.allocatedBytes} bytes allocated`)
    assert.ok(volume.usedBytes !== null && volume.usedBytes > 0)
    const super_ = await run('dumpe2fs', ['-h', volume.path])
    assert.match(super_.stdout, /Filesystem state:\s+clean/, 'the init unmounted it at the graceful stop')
    assert.doesNotMatch(super_.stdout, /needs_recovery/)
    // Made empty (root's), it took the owner of the image's /data (redis) at its first mount, so that redis could write it.
    const root = await run('debugfs', ['-R', 'stat /', volume.path])
    assert.match(root.stdout, /User:\s+[1-9]\d*\s+Group:\s+[1-9]\d*/, root.stdout.slice(0, 300))
    assert.ok((await run('debugfs', ['-R', 'ls -l /', volume.path])).stdout.includes('appendonly'), 'redis wrote its append-only file there')
    await daemon.api.call('DELETE', `/v1/volumes/${VOLUME}`)
    await rejectsWith(daemon.api.call('GET', `/v1/volumes/${VOLUME}`), 'UIG_ERR_VOLUME_NOT_FOUND')
  })
})
