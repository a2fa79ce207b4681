import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import type { ClaimResult, PoolStatus } from '../../src/core/pool.js'
import type { Vm } from '../../src/core/vm.js'
import { rejectsWith } from '../helpers/assertions.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { helloAt } from '../helpers/hello-client.js'
import { createTestContext, exampleSpec, packageRoot, runCli, type TestContext } from '../helpers/fixtures.js'


describe('warm pools of prespawned VMs', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let daemon: DaemonProcess

  before(async () => {
    ctx = await createTestContext()
    await ctx.builder.build(JSON.parse(await readFile(exampleSpec('hello'), 'utf8')), join(packageRoot, 'examples/hello'))
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.245.${Math.floor(Math.random() * 200)}.0/24` })
    await daemon.start()
  })
  after(async () => {
    await daemon.removeEverything()
    await ctx.cleanup()
  })

  test('a pool fills with paused VMs; a claim resumes one, which boots and serves; the pool refills', { timeout: 180_000 }, async () => {
    await daemon.api.call('POST', '/v1/pools', { name: 'web', image: 'hello', min: 2, max: 4, refillConcurrency: 2 })
    const full = await daemon.waitForPool('web', (p) => p.ready === 2)
    assert.equal(full.claimed, 0)
    const members = (await daemon.api.call<Vm[]>('GET', '/v1/vms')).filter((vm) => vm.pool?.name === 'web')
    assert.equal(members.length, 2)
    for (const vm of members) {
      assert.equal(vm.state, 'paused', 'prespawned: QEMU started, vCPUs stopped, not booted')
      assert.ok(vm.ipAddress !== null && vm.macAddress !== null && vm.tap !== null, 'tap, IP and MAC are attached before the claim')
    }
    const claim = await daemon.api.call<ClaimResult>('POST', '/v1/pools/web/claim')
    assert.equal(claim.path, 'pool')
    assert.equal(claim.vm.state, 'running')
    assert.deepEqual(claim.vm.pool, { name: 'web', claimed: true })
    assert.ok(claim.timings.totalMs >= claim.timings.resumeMs)
    // The instance's own start (prespawned: spawned paused), then the claim's steps.
    assert.equal(claim.vm.startTimings?.plan, 'prespawned')
    assert.deepEqual(claim.vm.startTimings?.steps.map((s) => s.name), ['resolve-image', 'check-resources', 'attach-network', 'spawn', 'record', 'claim-wait', 'resume', 'hand-out'])
    assert.ok((claim.vm.startTimings?.claimMs ?? -1) >= 0)
    assert.match(await helloAt(claim.vm.ipAddress ?? ''), /Hello from uigniter!/)
    const refilled = await daemon.waitForPool('web', (p) => p.ready === 2 && p.claimed === 1)
    assert.equal(refilled.hits, 1)

    await daemon.api.call('POST', '/v1/pools/web/release', { vm: claim.vm.id })
    await rejectsWith(daemon.api.call('GET', `/v1/vms/${claim.vm.id}`), 'UIG_ERR_VM_NOT_FOUND')
    await daemon.waitForPool('web', (p) => p.claimed === 0 && p.ready >= 2)

    const metrics = await daemon.api.call<string>('GET', '/metrics')
    assert.match(metrics, /uigniter_pool_instances\{pool="web",state="ready"\} [2-9]/)
    assert.match(metrics, /uigniter_pool_hits_total\{pool="web"\} 1/)
  })

  test('empty-pool policies through the API: reject, and create beyond the pool', { timeout: 180_000 }, async () => {
    await daemon.api.call('POST', '/v1/pools', { name: 'cold', image: 'hello', min: 0, max: 1, onEmpty: 'reject' })
    await rejectsWith(daemon.api.call('POST', '/v1/pools/cold/claim'), 'UIG_ERR_POOL_EMPTY')
    const created = await daemon.api.call<ClaimResult>('POST', '/v1/pools/cold/claim', { onEmpty: 'create' })
    assert.equal(created.path, 'cold')
    assert.equal(created.vm.state, 'running')
    await daemon.api.call('POST', '/v1/pools/cold/release', { vm: created.vm.id, onRelease: 'destroy' })
    const after = await daemon.api.call<PoolStatus>('GET', '/v1/pools/cold')
    assert.deepEqual([after.ready, after.claimed, after.misses], [0, 0, 2])
  })

  test('bad pool specs get their codes', { timeout: 180_000 }, async () => {
    await rejectsWith(daemon.api.call('POST', '/v1/pools', { name: 'bad', image: 'hello', min: 5, max: 2 }), 'UIG_ERR_POOL_POLICY_INVALID', 'min (5)')
    await rejectsWith(daemon.api.call('POST', '/v1/pools', { name: 'bad', image: 'nope' }), 'UIG_ERR_IMAGE_NOT_FOUND')
    await rejectsWith(daemon.api.call('POST', '/v1/pools', { name: 'web', image: 'hello' }), 'UIG_ERR_POOL_NAME_IN_USE')
    await rejectsWith(daemon.api.call('POST', '/v1/pools', { name: 'bad', image: 'hello', onEmpty: 'panic' }), 'UIG_ERR_API_VALIDATION')
    await rejectsWith(daemon.api.call('POST', '/v1/pools/nope/claim'), 'UIG_ERR_POOL_NOT_FOUND')
  })

  test('a daemon restart adopts the pool\'s ready VMs back; deleting the pool removes them', { timeout: 180_000 }, async () => {
    const before = (await daemon.api.call<Vm[]>('GET', '/v1/vms')).filter((vm) => vm.pool?.name === 'web').map((vm) => vm.id).sort()
    await daemon.stop()
    await daemon.start()
    const restored = await daemon.waitForPool('web', (p) => p.ready >= 2)
    assert.equal(restored.creating, 0)
    const again = (await daemon.api.call<Vm[]>('GET', '/v1/vms')).filter((vm) => vm.pool?.name === 'web').map((vm) => vm.id).sort()
    assert.deepEqual(again, before, 'the same VMs, none made anew')
    const cli = await runCli(['pool', 'ls'], { env: daemon.env })
    assert.match(cli.stdout, /^web\s+hello\s+prespawned\s+[2-9]\s+0\s+0\s+2\s+4/m)
    await daemon.api.call('DELETE', '/v1/pools/web')
    for (const id of before) await rejectsWith(daemon.api.call('GET', `/v1/vms/${id}`), 'UIG_ERR_VM_NOT_FOUND')
  })
  test('a pool whose makes fail backs off and heals by itself, with no claim; status, metrics and events say so', { timeout: 180_000 }, async () => {
    const spec = { ...JSON.parse(await readFile(exampleSpec('hello'), 'utf8')) as Record<string, unknown>, name: 'hello-heal' }
    await ctx.builder.build(spec, join(packageRoot, 'examples/hello'))
    await daemon.api.call('POST', '/v1/pools', { name: 'heal', image: 'hello-heal', min: 0, max: 2 })
    const events: string[] = []
    const subscription = new AbortController()
    const streaming = daemon.api.stream('/v1/events', (text) => { events.push(text) }, subscription.signal).catch(() => {})
    try {
      // The image goes away under the pool: every make fails until it is back.
      await ctx.store.remove('hello-heal')
      await daemon.api.call('PATCH', '/v1/pools/heal', { min: 1 })
      const failing = await daemon.waitForPool('heal', (p) => p.consecutiveFailures >= 2, 30_000)
      assert.match(failing.lastError ?? '', /hello-heal/)
      assert.ok(failing.retryAt !== null, 'the status says when it tries again')
      assert.match(await daemon.api.call<string>('GET', '/metrics'), /uigniter_pool_consecutive_failures\{pool="heal"\} [2-9]/)
      await ctx.builder.build(spec, join(packageRoot, 'examples/hello'))
      const healed = await daemon.waitForPool('heal', (p) => p.ready === 1, 60_000)
      assert.equal(healed.consecutiveFailures, 0)
      assert.equal(healed.retryAt, null)
      const stream = events.join('')
      assert.match(stream, /event: pool\.create-failed\ndata: .*"pool":"heal".*tries again in/)
      assert.match(stream, /event: pool\.recovered\ndata: .*"pool":"heal"/)
    } finally {
      subscription.abort()
      await streaming
      await daemon.api.call('DELETE', '/v1/pools/heal')
    }
  })
})
