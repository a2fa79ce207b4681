import assert from 'node:assert/strict'
import { access, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import type { ClaimResult } from '../../src/core/pool.js'
import type { TemplateInfo } from '../../src/core/template.js'
import type { Vm } from '../../src/core/vm.js'
import { probeOnce } from '../../src/core/app-probe.js'
import { rejectsWith } from '../helpers/assertions.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { helloAt } from '../helpers/hello-client.js'
import { createTestContext, exampleSpec, packageRoot, runCli, type TestContext } from '../helpers/fixtures.js'
import { stepMs } from '../../src/core/start-steps.js'

interface NodeAnswer { host: string, ip: string, mac: string, random: string }


async function alive (pid: number): Promise<boolean> {
  return await access(`/proc/${pid}`).then(() => true, () => false)
}

describe('templates and clones through the daemon', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let daemon: DaemonProcess

  before(async () => {
    ctx = await createTestContext()
    for (const example of ['hello', 'node-http']) {
      await ctx.builder.build(JSON.parse(await readFile(exampleSpec(example), 'utf8')), join(packageRoot, 'examples', example))
    }
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.243.${Math.floor(Math.random() * 200)}.0/24` })
    await daemon.start()
  })
  after(async () => {
    await daemon.removeEverything()
    await ctx.cleanup()
  })

  test('clones of node-http, snapshotted with its app ready, answer HTTP with their own address, MAC, hostname and random bytes', { timeout: 180_000 }, async () => {
    const template = await daemon.api.call<TemplateInfo>('POST', '/v1/templates', { name: 'node', image: 'node-http', ready: 'app' })
    assert.equal(template.ready, 'app')
    assert.equal(template.port, 8080, 'the image\'s first port')
    assert.equal(template.network, 'bridge')
    assert.ok(template.stateBytes > 0 && template.stateBytes < 1024 * 1024, `the device state is small (${template.stateBytes} bytes): the RAM is not in it`)
    assert.equal(template.clones, 0)

    const clones: Vm[] = []
    for (let i = 0; i < 3; i++) clones.push(await daemon.api.call<Vm>('POST', '/v1/vms', { template: 'node', name: `node-${i}` }))
    const answers: NodeAnswer[] = []
    for (const vm of clones) {
      assert.equal(vm.startPath, 'clone')
      assert.equal(vm.template, 'node')
      assert.equal(vm.image, 'node-http:latest')
      assert.deepEqual(vm.startTimings?.steps.map((s) => s.name), ['resolve-template', 'check-request', 'attach-network', 'spawn', 'restore', 'identity', 'after-clone', 'record'], 'the clone lists every step of its start (node-http has the Node preload\'s signal hook)')
      assert.ok((stepMs(vm.startTimings, 'identity') ?? 0) > 0 && (stepMs(vm.startTimings, 'restore') ?? 0) > 0, 'each step has its duration')
      const answer = JSON.parse(await helloAt(vm.ipAddress ?? '', 10_000)) as NodeAnswer
      assert.deepEqual([answer.host, answer.ip, answer.mac], [vm.name, vm.ipAddress, vm.macAddress], 'the guest took the identity its VM record shows')
      answers.push(answer)
    }
    for (const key of ['ip', 'mac', 'random'] as const) {
      assert.equal(new Set(answers.map((a) => a[key])).size, answers.length, `no two clones share a ${key}: ${answers.map((a) => a[key]).join(', ')}`)
    }
    assert.ok(answers.every((a) => /^[0-9a-f]{32}$/.test(a.random)))
    assert.equal((await daemon.api.call<TemplateInfo>('GET', '/v1/templates/node')).clones, 3)
    const ps = await runCli(['ps'], { env: daemon.env })
    assert.match(ps.stdout, /node-0 .* clone of node/)
    const ls = await runCli(['template', 'ls'], { env: daemon.env })
    assert.match(ls.stdout, /^node\s+node-http:latest\s+app\s+8080\s+1\s+256 MiB\s+\S+ \S+\s+[\d.]+ s\s+3\s/m)
    const run = await runCli(['run', '-d', '--name', 'cli-clone', '--template', 'node'], { env: daemon.env })
    const cli = await daemon.api.call<Vm>('GET', `/v1/vms/${run.stdout.trim()}`)
    assert.deepEqual([cli.name, cli.startPath, cli.template], ['cli-clone', 'clone', 'node'])
    await daemon.api.call('DELETE', '/v1/vms/cli-clone?force=true')
    const bad = await runCli(['run', '--template', 'node', 'node-http'], { env: daemon.env })
    assert.equal(bad.code, 2)
    assert.match(bad.stderr, /UIG_ERR_CLI_USAGE/)
  })

  test('a template cannot be deleted under live clones; once they are gone it can', { timeout: 180_000 }, async () => {
    await rejectsWith(daemon.api.call('DELETE', '/v1/templates/node'), 'UIG_ERR_TEMPLATE_IN_USE', '3 live clone(s)')
    const clones = (await daemon.api.call<Vm[]>('GET', '/v1/vms')).filter((vm) => vm.template === 'node')
    await daemon.api.call('DELETE', `/v1/vms/${clones[0]?.id ?? ''}?force=true`)
    // The template is still there for the other two: a new clone still works.
    const another = await daemon.api.call<Vm>('POST', '/v1/vms', { template: 'node' })
    assert.match(await helloAt(another.ipAddress ?? '', 10_000), /"from uigniter"/)
    for (const vm of [...clones.slice(1), another]) await daemon.api.call('DELETE', `/v1/vms/${vm.id}?force=true`)
    const removed = await daemon.api.call<TemplateInfo>('DELETE', '/v1/templates/node')
    await assert.rejects(access(removed.memoryPath), 'the RAM file is gone')
    await rejectsWith(daemon.api.call('GET', '/v1/templates/node'), 'UIG_ERR_TEMPLATE_NOT_FOUND')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { template: 'node' }), 'UIG_ERR_TEMPLATE_NOT_FOUND')
  })

  test('a ready: init template gives each clone its own env before its app starts; a ready: app one refuses env', { timeout: 180_000 }, async () => {
    await daemon.api.call('POST', '/v1/templates', { name: 'node-init', image: 'node-http', ready: 'init' })
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { template: 'node-init', env: { PORT: '9090' } })
    const deadline = Date.now() + 30_000
    while (!await probeOnce({ host: vm.ipAddress ?? '', port: 9090, httpPath: '/' })) {
      assert.ok(Date.now() < deadline, 'the clone\'s app listens on the port its env named')
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
    await daemon.api.call('DELETE', `/v1/vms/${vm.id}?force=true`)
    await daemon.api.call('DELETE', '/v1/templates/node-init')

    await daemon.api.call('POST', '/v1/templates', { name: 'hello', image: 'hello', ready: 'app', httpPath: '/' })
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { template: 'hello', env: { A: 'b' } }), 'UIG_ERR_CLONE_REQUEST', 'ready: init')
  })

  test('bad template and clone requests get their codes', { timeout: 180_000 }, async () => {
    await rejectsWith(daemon.api.call('POST', '/v1/templates', { name: 'x', image: 'nope' }), 'UIG_ERR_IMAGE_NOT_FOUND')
    await rejectsWith(daemon.api.call('POST', '/v1/templates', { name: 'Bad Name', image: 'hello' }), 'UIG_ERR_API_VALIDATION')
    await rejectsWith(daemon.api.call('POST', '/v1/templates', { name: 'x', image: 'hello', ready: 'init', httpPath: '/' }), 'UIG_ERR_TEMPLATE_INVALID', 'httpPath')
    await rejectsWith(daemon.api.call('POST', '/v1/templates', { name: 'hello', image: 'hello' }), 'UIG_ERR_TEMPLATE_NAME_IN_USE')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { template: 'nope' }), 'UIG_ERR_TEMPLATE_NOT_FOUND')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { template: 'hello', image: 'hello' }), 'UIG_ERR_API_VALIDATION', 'either image')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', {}), 'UIG_ERR_API_VALIDATION')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { template: 'hello', args: ['9000'] }), 'UIG_ERR_CLONE_REQUEST', 'arguments')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { template: 'hello', memoryMiB: 512 }), 'UIG_ERR_CLONE_REQUEST', '64 MiB')
    await rejectsWith(daemon.api.call('POST', '/v1/vms', { template: 'hello', network: 'user' }), 'UIG_ERR_CLONE_REQUEST', 'bridge')
    await rejectsWith(daemon.api.call('POST', '/v1/pools', { name: 'p', kind: 'clone', image: 'hello' }), 'UIG_ERR_POOL_POLICY_INVALID', 'template')
    await rejectsWith(daemon.api.call('POST', '/v1/pools', { name: 'p', kind: 'booted', template: 'hello' }), 'UIG_ERR_POOL_POLICY_INVALID')
    await rejectsWith(daemon.api.call('POST', '/v1/pools', { name: 'p', kind: 'clone', template: 'nope' }), 'UIG_ERR_TEMPLATE_NOT_FOUND')
  })

  test('a clone pool hands out serving clones and refills; its template cannot be deleted meanwhile', { timeout: 180_000 }, async () => {
    await daemon.api.call('POST', '/v1/pools', { name: 'clones', kind: 'clone', template: 'hello', min: 2, max: 4, refillConcurrency: 2 })
    await daemon.waitForPool('clones', (p) => p.ready === 2)
    const claim = await daemon.api.call<ClaimResult>('POST', '/v1/pools/clones/claim')
    assert.equal(claim.path, 'pool')
    assert.equal(claim.vm.startPath, 'pool')
    assert.equal(claim.vm.template, 'hello')
    // Its app was already serving: the first try answers.
    assert.match(await helloAt(claim.vm.ipAddress ?? '', 1000), /Hello from uigniter!/)
    await daemon.waitForPool('clones', (p) => p.ready === 2 && p.claimed === 1)
    await rejectsWith(daemon.api.call('DELETE', '/v1/templates/hello'), 'UIG_ERR_TEMPLATE_IN_USE')
    await daemon.api.call('POST', '/v1/pools/clones/release', { vm: claim.vm.id, onRelease: 'destroy' })
    await daemon.api.call('DELETE', '/v1/pools/clones')
    const empty = await daemon.api.call<ClaimResult>('POST', '/v1/pools', { name: 'clones-empty', kind: 'clone', template: 'hello', min: 0, max: 1 })
    assert.ok(empty !== undefined)
    const made = await daemon.api.call<ClaimResult>('POST', '/v1/pools/clones-empty/claim')
    assert.equal(made.path, 'clone', 'an empty clone pool with policy create clones one for the claim')
    await daemon.api.call('DELETE', '/v1/pools/clones-empty')
    await daemon.api.call('DELETE', `/v1/vms/${made.vm.id}?force=true`)
  })

  test('a booted pool holds booted guests whose app starts at the claim', { timeout: 180_000 }, async () => {
    await daemon.api.call('POST', '/v1/pools', { name: 'booted', kind: 'booted', image: 'hello', min: 1, max: 2 })
    await daemon.waitForPool('booted', (p) => p.ready === 1)
    const [ready] = (await daemon.api.call<Vm[]>('GET', '/v1/vms')).filter((vm) => vm.pool?.name === 'booted')
    assert.equal(ready?.state, 'running')
    const logs = await daemon.api.call<string>('GET', `/v1/vms/${ready?.id ?? ''}/logs`)
    assert.match(logs, /UIGNITER:WAITING for=identity/)
    assert.doesNotMatch(logs, /UIGNITER:APP-STARTED/, 'booted, but the app waits for its claim')
    const claim = await daemon.api.call<ClaimResult>('POST', '/v1/pools/booted/claim', { env: { GREETING: 'hi' } })
    assert.equal(claim.vm.id, ready?.id)
    assert.match(await helloAt(claim.vm.ipAddress ?? ''), /Hello from uigniter!/)
    await rejectsWith(daemon.api.call('POST', '/v1/pools/clones-none/claim'), 'UIG_ERR_POOL_NOT_FOUND')
    await daemon.api.call('DELETE', '/v1/pools/booted')
    await daemon.api.call('DELETE', `/v1/vms/${claim.vm.id}?force=true`)
  })

  test('a clone that misses its identity deadline is destroyed and reported, never handed out; clones outlive a daemon restart', { timeout: 180_000 }, async () => {
    const kept = await daemon.api.call<Vm>('POST', '/v1/vms', { template: 'hello', name: 'kept' })
    await daemon.stop()
    daemon.env.UIGNITER_CLONE_IDENTITY_TIMEOUT_MS = '1'
    await daemon.start()
    const adopted = await daemon.api.call<Vm>('GET', '/v1/vms/kept')
    assert.equal(adopted.state, 'running', 'the restarted daemon adopted the clone')
    assert.equal(adopted.pid, kept.pid)

    await rejectsWith(daemon.api.call('POST', '/v1/vms', { template: 'hello', name: 'late' }), 'UIG_ERR_CLONE_IDENTITY')
    const late = await daemon.api.call<Vm>('GET', '/v1/vms/late')
    assert.equal(late.state, 'failed')
    assert.equal(late.exit?.reason, 'boot-failed')
    assert.match(late.exit?.detail ?? '', /identity/)
    assert.equal(late.tap, null, 'its network was released')
    const pidFile = await readFile(join(late.stateDir, 'qemu.pid'), 'utf8').catch(() => '')
    if (pidFile !== '') assert.equal(await alive(Number(pidFile.trim())), false, 'its QEMU was killed')

    delete daemon.env.UIGNITER_CLONE_IDENTITY_TIMEOUT_MS
    await daemon.stop()
    await daemon.start()
    await daemon.api.call('DELETE', '/v1/vms/kept?force=true')
    assert.match(await helloAt((await daemon.api.call<Vm>('POST', '/v1/vms', { template: 'hello' })).ipAddress ?? '', 10_000), /Hello from uigniter!/)
  })
})
