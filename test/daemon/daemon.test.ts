import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { request } from 'node:http'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { httpGetWithRetry } from '../../src/core/app-probe.js'
import type { Vm } from '../../src/core/vm.js'
import { SqliteStore } from '../../src/store/sqlite-store.js'
import { freePort } from '../../src/core/free-port.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { helloAt } from '../helpers/hello-client.js'
import { memcachedCommand } from '../helpers/memcached-text.js'
import { createTestContext, exampleSpec, packageRoot, runCli, type TestContext } from '../helpers/fixtures.js'
import { rejectsWith } from '../helpers/assertions.js'

const TOKEN = 'test-token-0123456789'


/** A plain HTTP request over TCP (the CLI's client uses the unix socket). */
async function tcpRequest (port: number, path: string, headers: Record<string, string> = {}): Promise<{ status: number, body: string }> {
  return await new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, headers }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { body += c })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

describe('the daemon: VMs on a real bridge, driven through the REST API', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let daemon: DaemonProcess
  const subnetByte = 100 + Math.floor(Math.random() * 100)

  before(async () => {
    ctx = await createTestContext()
    await ctx.builder.build(JSON.parse(await readFile(exampleSpec('memcached'), 'utf8')), join(packageRoot, 'examples/memcached'))
    await ctx.builder.build(JSON.parse(await readFile(exampleSpec('hello'), 'utf8')), join(packageRoot, 'examples/hello'))
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.249.${subnetByte}.0/24`, UIGNITER_TOKEN: TOKEN })
    await daemon.start()
  })
  after(async () => {
    for (const vm of await daemon.api.call<Vm[]>('GET', '/v1/vms?all=true').catch(() => [])) {
      await daemon.api.call('DELETE', `/v1/vms/${vm.id}?force=true`).catch(() => {})
    }
    await daemon.stop()
    await daemon.removeNetwork()
    await ctx.cleanup()
  })

  const vms: Vm[] = []

  test('two memcached VMs answer on their own addresses on the bridge', { timeout: 180_000 }, async () => {
    for (const name of ['mc-a', 'mc-b']) vms.push(await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'memcached', name }))
    const [a, b] = vms
    assert.ok(a?.ipAddress !== null && b?.ipAddress !== null)
    assert.notEqual(a?.ipAddress, b?.ipAddress)
    assert.notEqual(a?.macAddress, b?.macAddress)
    for (const vm of vms) {
      assert.equal(vm.state, 'running')
      assert.match(vm.ipAddress ?? '', new RegExp(`^10\\.249\\.${subnetByte}\\.`))
      assert.match(await memcachedCommand(vm.ipAddress ?? '', 11211, 'version\r\n'), /^VERSION 1\./)
    }
  })

  test('a published port reaches the VM through 127.0.0.1', { timeout: 180_000 }, async () => {
    const hostPort = await freePort()
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'hello', name: 'web', publish: [{ hostPort, guestPort: 8080 }] })
    const answer = await httpGetWithRetry(hostPort, '/', 60_000)
    assert.equal(answer.status, 200)
    assert.match(answer.body, /Hello from uigniter! \(web\)/)
    const stopped = await daemon.api.call<Vm>('POST', `/v1/vms/${vm.id}/stop`)
    assert.equal(stopped.state, 'exited')
    assert.equal(stopped.exit?.reason, 'stopped')
    assert.equal(stopped.exit?.appExitCode, 0, 'the app exited by itself on SIGTERM')
    const again = await daemon.api.call<Vm>('POST', `/v1/vms/${vm.id}/stop`)
    assert.deepEqual(again.exit, stopped.exit, 'stopping a stopped VM changes nothing')
  })

  test('an address handed out again reaches the new VM at once', { timeout: 180_000 }, async () => {
    const first = await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'hello', name: 'reuse-a' })
    await helloAt(first.ipAddress ?? '')
    await daemon.api.call('DELETE', `/v1/vms/${first.id}?force=true`)
    const second = await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'hello', name: 'reuse-b' })
    assert.equal(second.ipAddress, first.ipAddress, 'the lowest free address comes back')
    assert.notEqual(second.macAddress, first.macAddress)
    // A boot takes a few seconds here. bench/pool-claim.js once saw 45 s starts from a stale
    // neighbour entry for a reused address (fixed by flushing it at attach); this sequence
    // did not reproduce that, but it guards the reuse path as a whole.
    const body = await helloAt(second.ipAddress ?? '', 15_000)
    assert.match(body, /\(reuse-b\)/)
    await daemon.api.call('DELETE', `/v1/vms/${second.id}?force=true`)
  })

  test('bad input gets its code', { timeout: 180_000 }, async () => {
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { image: 'no-such-image' }), 'UIG_ERR_IMAGE_NOT_FOUND')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { image: 'memcached', name: 'mc-a' }), 'UIG_ERR_VM_NAME_IN_USE')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { image: 'memcached', memoryMiB: 1024 * 1024 }), 'UIG_ERR_VM_RESOURCES', 'MiB')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { image: 'memcached', colour: 'blue' }), 'UIG_ERR_API_VALIDATION')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { image: 'memcached', vcpus: 'many' }), 'UIG_ERR_API_VALIDATION', 'vcpus')
    await rejectsWith(daemon.api.call('GET', '/v1/vms/nope'), 'UIG_ERR_VM_NOT_FOUND')
    await rejectsWith(daemon.api.call('GET', '/v1/nothing'), 'UIG_ERR_API_NOT_FOUND')
    await rejectsWith(daemon.api.call('DELETE', `/v1/vms/${vms[0]?.id ?? ''}`), 'UIG_ERR_VM_INVALID_STATE')
  })

  test('an exhausted address pool is a clear error', { timeout: 180_000 }, async () => {
    // Another process takes every free address, as a crowd of VMs would.
    const store = new SqliteStore(join(ctx.dataDir, 'uigniter.db'))
    const taken: string[] = []
    try {
      for (let host = 2; host < 255; host++) {
        const ip = `10.249.${subnetByte}.${host}`
        if (store.ipAllocations.reserve(ip, 'test-crowd')) taken.push(ip)
      }
      await rejectsWith(daemon.api.call('POST', '/v1/vms', { image: 'memcached' }), 'UIG_ERR_NET_POOL_EXHAUSTED')
    } finally {
      store.ipAllocations.releaseOwner('test-crowd')
      store.close()
    }
  })

  test('kill -9 of a QEMU is noticed and reported with a reason', { timeout: 180_000 }, async () => {
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'hello', name: 'victim' })
    assert.ok(vm.pid !== null)
    process.kill(vm.pid, 'SIGKILL')
    const ended = await daemon.waitForVm(vm.id, ['exited', 'failed'], 30_000)
    assert.equal(ended.exit?.reason, 'killed')
    assert.ok((ended.exit?.detail ?? '').length > 0)
  })

  test('kill -9 of the daemon, then a restart, re-adopts every running VM with its address', { timeout: 180_000 }, async () => {
    const before = await daemon.api.call<Vm[]>('GET', '/v1/vms')
    assert.ok(before.length >= 2)
    await daemon.crash()
    for (const vm of before) assert.match(await memcachedCommand(vm.ipAddress ?? '', 11211, 'version\r\n'), /^VERSION/, 'VMs outlive the daemon')
    await daemon.start()
    const afterRestart = await daemon.api.call<Vm[]>('GET', '/v1/vms')
    assert.deepEqual(afterRestart.map((vm) => [vm.id, vm.state, vm.ipAddress, vm.pid]), before.map((vm) => [vm.id, vm.state, vm.ipAddress, vm.pid]))
    const store = new SqliteStore(join(ctx.dataDir, 'uigniter.db'))
    try {
      assert.deepEqual(store.ipAllocations.list().map((a) => [a.ip, a.owner]).sort(), before.map((vm) => [vm.ipAddress, vm.id]).sort())
    } finally {
      store.close()
    }
    const info = await daemon.api.call<{ recovered: { adopted: number } }>('GET', '/v1/info')
    assert.equal(info.recovered.adopted, before.length)
    // Adopted VMs are still under control: stop one and see its exit.
    const stopped = await daemon.api.call<Vm>('POST', `/v1/vms/${before[0]?.id ?? ''}/stop`)
    assert.equal(stopped.state, 'exited')
  })

  test('a VM that dies while the daemon is down is marked with the reason', { timeout: 180_000 }, async () => {
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'hello', name: 'orphan' })
    await daemon.crash()
    process.kill(vm.pid ?? 0, 'SIGKILL')
    // A crash in the middle of a create: a record without a usable state directory.
    const store = new SqliteStore(join(ctx.dataDir, 'uigniter.db'))
    const halfMade: Vm = { ...vm, id: 'half0made0vm0id', name: 'half-made', state: 'starting', stateDir: join(ctx.dataDir, 'vms', 'half0made0vm0id'), pid: null }
    store.insertVm(halfMade)
    store.close()
    await daemon.start()
    const marked = await daemon.api.call<Vm>('GET', `/v1/vms/${vm.id}`)
    assert.equal(marked.state, 'exited')
    assert.equal(marked.exit?.reason, 'died-while-daemon-down')
    const half = await daemon.api.call<Vm>('GET', '/v1/vms/half-made')
    assert.equal(half.state, 'exited')
    assert.match(half.exit?.detail ?? '', /state directory/)
  })

  test('the original Uigniter API works unchanged', { timeout: 180_000 }, async () => {
    const created = await daemon.api.call<{ id: string, ip_address: string }>('POST', '/vm/run', { image_name: 'memcached', cmdline: '', read_only: true })
    assert.deepEqual(Object.keys(created).sort(), ['id', 'ip_address'])
    assert.match(await memcachedCommand(created.ip_address, 11211, 'version\r\n'), /^VERSION/)
    const stopped = await daemon.api.call<{ id: string, state: string }>('POST', `/vm/${created.id}/stop`)
    assert.equal(stopped.state, 'exited')
  })

  test('events, pause and resume, logs, images, and the bearer token on TCP', { timeout: 180_000 }, async () => {
    const vm = await daemon.api.call<Vm>('GET', '/v1/vms/mc-b')
    const events: string[] = []
    const subscription = new AbortController()
    const streaming = daemon.api.stream(`/v1/events?vm=${vm.id}`, (text) => { events.push(text) }, subscription.signal).catch(() => {})
    await new Promise((resolve) => setTimeout(resolve, 200))
    assert.equal((await daemon.api.call<Vm>('POST', `/v1/vms/${vm.id}/pause`)).state, 'paused')
    await assert.rejects(memcachedCommand(vm.ipAddress ?? '', 11211, 'version\r\n', 1500), 'a paused VM does not answer')
    await rejectsWith(daemon.api.call('POST', `/v1/vms/${vm.id}/pause`).then(() => daemon.api.call('POST', '/v1/vms/victim/resume')), 'UIG_ERR_VM_INVALID_STATE')
    assert.equal((await daemon.api.call<Vm>('POST', `/v1/vms/${vm.id}/resume`)).state, 'running')
    assert.match(await memcachedCommand(vm.ipAddress ?? '', 11211, 'version\r\n'), /^VERSION/)
    await new Promise((resolve) => setTimeout(resolve, 200))
    const stream = events.join('')
    assert.match(stream, /event: vm\.state\ndata: \{[^\n]*"state":"paused"/)
    assert.match(stream, /event: vm\.state\ndata: \{[^\n]*"state":"running"/)
    subscription.abort()
    await streaming

    const logs = await daemon.api.call<string>('GET', `/v1/vms/${vm.id}/logs?tail=100000`)
    assert.match(logs, /UIGNITER:APP-STARTED/)
    assert.match(logs, /slab class|server listening|Linux version|UIGNITER/)

    const images = await daemon.api.call<Array<{ name: string }>>('GET', '/v1/images')
    assert.deepEqual(images.map((m) => m.name).sort(), ['hello', 'memcached'])
    assert.equal((await daemon.api.call<{ name: string }>('GET', '/v1/images/memcached:latest')).name, 'memcached')

    const port = Number(daemon.env.UIGNITER_API_LISTEN?.split(':')[1])
    const denied = await tcpRequest(port, '/v1/vms')
    assert.equal(denied.status, 401)
    assert.equal((JSON.parse(denied.body) as { code: string }).code, 'UIG_ERR_API_UNAUTHORIZED')
    assert.equal((await tcpRequest(port, '/v1/vms', { authorization: `Bearer ${TOKEN}` })).status, 200)
  })

  test('OpenAPI, metrics, health and the CLI', { timeout: 180_000 }, async () => {
    const openapi = await daemon.api.call<{ openapi: string, paths: Record<string, unknown> }>('GET', '/openapi.json')
    assert.match(openapi.openapi, /^3\./)
    for (const path of ['/v1/vms', '/v1/vms/{id}/stop', '/vm/run', '/vm/{id}/stop', '/v1/images']) assert.ok(path in openapi.paths, path)
    const metrics = await daemon.api.call<string>('GET', '/metrics')
    assert.match(metrics, /uigniter_vms\{state="running"\} \d+/)
    // Counters start at zero with each daemon; the legacy VM above started and stopped under this one.
    assert.match(metrics, /uigniter_vm_starts_total\{path="cold"\} [1-9]/)
    assert.match(metrics, /uigniter_vm_exits_total\{reason="stopped"\} [1-9]/)
    const ps = await runCli(['ps'], { env: daemon.env })
    assert.equal(ps.code, 0, ps.stderr)
    assert.match(ps.stdout, /^ID\s+NAME\s+IMAGE\s+STATE/)
    assert.match(ps.stdout, /mc-b\s+memcached:latest\s+running/)
    const inspect = await runCli(['inspect', 'mc-b'], { env: daemon.env })
    assert.equal((JSON.parse(inspect.stdout) as Vm).name, 'mc-b')
    const steps = await runCli(['inspect', '--steps', 'mc-b'], { env: daemon.env })
    assert.equal(steps.code, 0, steps.stderr)
    assert.match(steps.stdout, /^mc-b: cold start, [\d.]+ ms$/m)
    const listed = [...steps.stdout.matchAll(/^([a-z-]+)\s+([\d.]+)\s*([\d.]*)$/gm)].map((m) => m[1])
    for (const step of ['resolve-image', 'check-resources', 'attach-network', 'spawn', 'record']) assert.ok(listed.includes(step), `inspect --steps lists ${step}: ${steps.stdout}`)
    const missing = await runCli(['stop', 'nope'], { env: daemon.env })
    assert.equal(missing.code, 1)
    assert.match(missing.stderr, /UIG_ERR_VM_NOT_FOUND/)
    assert.ok(!(await runCli(['run', '-d', '--memory', 'lots', 'hello'], { env: daemon.env })).stderr.includes('unexpected'))
  })
})

