import assert from 'node:assert/strict'
import { access, mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { waitForAppAnswer } from '../../src/core/app-probe.js'
import type { ImageManifest } from '../../src/core/image.js'
import type { TemplateInfo } from '../../src/core/template.js'
import type { Vm } from '../../src/core/vm.js'
import { mapLimit } from '../../bench/lib/measure.js'
import { rejectsWith } from '../helpers/assertions.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { createTestContext, runCli, type TestContext } from '../helpers/fixtures.js'
import { RANDOM_KEYS, randomAppSpec } from '../snapshot/random-app.js'
import { stepMs } from '../../src/core/start-steps.js'

type Answer = Record<typeof RANDOM_KEYS[number] | 'host', string> & { hooks: number }

/** GET http://ip:8080/ once the app answers (a fresh clone translates node's code anew under TCG). */
async function values (ip: string, timeoutMs = 30_000): Promise<Answer> {
  const answer = await waitForAppAnswer({ host: ip, port: 8080, httpPath: '/' }, timeoutMs, undefined,
    { intervalMs: 50, attempt: { connectMs: 10_000, answerMs: 10_000 } })
  return JSON.parse(answer.body) as Answer
}

async function alive (pid: number): Promise<boolean> {
  return await access(`/proc/${pid}`).then(() => true, () => false)
}

describe('clone safety: after-clone hooks and the Node.js preload', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let daemon: DaemonProcess
  let scratch: string
  let image: ImageManifest

  before(async () => {
    ctx = await createTestContext()
    scratch = await mkdtemp(join(tmpdir(), 'uigniter-clone-safety-'))
    image = await ctx.builder.build(await randomAppSpec(scratch))
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.241.${Math.floor(Math.random() * 200)}.0/24` })
    await daemon.start()
  })
  after(async () => {
    await daemon.removeEverything()
    await ctx.cleanup()
    await rm(scratch, { recursive: true, force: true })
  })

  test('a node image is clone-safe with no change to its app: 20 clones give 20 distinct values from every random API', { timeout: 900_000 }, async () => {
    assert.equal(image.cloneSafe, true)
    assert.deepEqual(image.afterClone, { kind: 'signal', signal: 'SIGUSR2' })
    assert.match(image.env.NODE_OPTIONS ?? '', /--require \/uigniter\/clone-safe\.cjs/)
    const template = await daemon.api.call<TemplateInfo>('POST', '/v1/templates', { name: 'rand', image: 'random-app', ready: 'app' })
    assert.equal(template.cloneSafe, true)
    assert.deepEqual(template.afterClone, { kind: 'signal', signal: 'SIGUSR2', timeoutMs: 5000 })
    assert.deepEqual(template.warnings, [])

    // A few at a time: each clone is ~30 MB PSS, and its first answer translates node afresh under TCG.
    const answers = await mapLimit(Array.from({ length: 20 }, (_, i) => i), 4, async (i) => {
      const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { template: 'rand', name: `rand-${i}` })
      assert.ok((stepMs(vm.startTimings, 'after-clone') ?? -1) >= 0, 'the clone ran its hook before it was handed out')
      const answer = await values(vm.ipAddress ?? '')
      await daemon.api.call('DELETE', `/v1/vms/${vm.id}?force=true`)
      return { answer, afterCloneMs: stepMs(vm.startTimings, 'after-clone') ?? 0 }
    })
    process.stderr.write(`# after-clone step (ms): ${answers.map((a) => a.afterCloneMs).join(', ')}\n`)
    assert.equal(new Set(answers.map((a) => a.answer.host)).size, 20)
    for (const key of RANDOM_KEYS) {
      const seen = answers.map((a) => a.answer[key])
      assert.equal(new Set(seen).size, 20, `20 clones, 20 distinct ${key}: ${seen.join(' ')}`)
    }
  })

  test('a ready: app template of an image that is neither clone-safe nor hooked warns, in an event and in the CLI; it records so', { timeout: 300_000 }, async () => {
    const events: string[] = []
    const subscription = new AbortController()
    const streaming = daemon.api.stream('/v1/events', (text) => { events.push(text) }, subscription.signal).catch(() => {})
    const cli = await runCli(['template', 'create', 'rand-unsafe', 'random-app', '--ready', 'app', '--after-clone', 'none'], { env: daemon.env })
    assert.equal(cli.code, 0, cli.stderr)
    assert.match(cli.stderr, /^warning: template rand-unsafe: clones of this ready: app template .* neither clone-safe nor has an after-clone hook/m)
    const info = await daemon.api.call<TemplateInfo>('GET', '/v1/templates/rand-unsafe')
    assert.equal(info.cloneSafe, false)
    assert.equal(info.afterClone, null)
    assert.equal(info.warnings.length, 1)
    await new Promise((resolve) => setTimeout(resolve, 500))
    subscription.abort()
    await streaming
    assert.match(events.join(''), /event: template\.clone-unsafe\ndata: \{"name":"rand-unsafe","image":"random-app:latest","warning":"clones of this/)

    // What the warning is about: without the hook, clones start with the template's generators
    // (the preload's clock-step net may still rekey them; the hook is the guarantee).
    const [a, b] = await mapLimit([0, 1], 2, async (i) => {
      const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { template: 'rand-unsafe', name: `unsafe-${i}` })
      const answer = await values(vm.ipAddress ?? '')
      await daemon.api.call('DELETE', `/v1/vms/${vm.id}?force=true`)
      return answer
    })
    const shared = RANDOM_KEYS.filter((key) => a?.[key] === b?.[key])
    process.stderr.write(`# without the hook two clones shared: ${shared.join(', ') || 'nothing'}\n`)

    // A ready: init template needs no hook, and takes none.
    await rejectsWith(daemon.api.call('POST', '/v1/templates', { name: 'x', image: 'random-app', afterClone: { kind: 'signal' } }), 'UIG_ERR_TEMPLATE_INVALID', 'ready: app')
    await daemon.api.call('DELETE', '/v1/templates/rand-unsafe')
  })

  test('a failing hook kills the clone, which is never handed out; an answering HTTP hook lets it through', { timeout: 600_000 }, async () => {
    await daemon.api.call('POST', '/v1/templates', { name: 'rand-500', image: 'random-app', ready: 'app', afterClone: { kind: 'http', path: '/fail-hook', timeoutMs: 30_000 } })
    await daemon.api.call('POST', '/v1/templates', { name: 'rand-noack', image: 'random-app', ready: 'app', afterClone: { kind: 'signal', signal: 'SIGWINCH', timeoutMs: 1000 } })
    for (const [template, why] of [['rand-500', /answered 500/], ['rand-noack', /did not acknowledge its after-clone signal SIGWINCH within 1000 ms/]] as const) {
      const name = `bad-${template}`
      await rejectsWith(daemon.api.call('POST', '/v1/vms', { template, name }), 'UIG_ERR_CLONE_HOOK_FAILED')
      const vm = await daemon.api.call<Vm>('GET', `/v1/vms/${name}`)
      assert.equal(vm.state, 'failed')
      assert.equal(vm.exit?.reason, 'boot-failed')
      assert.match(vm.exit?.detail ?? '', why)
      assert.equal(vm.tap, null, 'its network was released')
      const pid = await readFile(join(vm.stateDir, 'qemu.pid'), 'utf8').catch(() => '')
      if (pid !== '') assert.equal(await alive(Number(pid.trim())), false, 'its QEMU was killed')
      assert.equal((await daemon.api.call<TemplateInfo>('GET', `/v1/templates/${template}`)).clones, 0)
    }
    // A clone pool of a failing template never holds an instance.
    await daemon.api.call('POST', '/v1/pools', { name: 'bad-pool', kind: 'clone', template: 'rand-500', min: 1, max: 1, onEmpty: 'reject' })
    await rejectsWith(daemon.api.call('POST', '/v1/pools/bad-pool/claim'), 'UIG_ERR_POOL_EMPTY')
    await daemon.api.call('DELETE', '/v1/pools/bad-pool')
    // The pool's last try may still be starting: it fails on its own hook, and then the template is free.
    const deadline = Date.now() + 60_000
    while ((await daemon.api.call<TemplateInfo>('GET', '/v1/templates/rand-500')).clones > 0) {
      assert.ok(Date.now() < deadline, 'the pool\'s clone in the making failed too')
      await new Promise((resolve) => setTimeout(resolve, 200))
    }
    assert.ok((await daemon.api.call<Vm[]>('GET', '/v1/vms?all=true')).filter((vm) => vm.template === 'rand-500').every((vm) => vm.state === 'failed'), 'no clone of the failing template ever ran')
    for (const t of ['rand-500', 'rand-noack']) await daemon.api.call('DELETE', `/v1/templates/${t}`)

    await daemon.api.call('POST', '/v1/templates', { name: 'rand-http', image: 'random-app', ready: 'app', afterClone: { kind: 'http', path: '/ok-hook', timeoutMs: 30_000 } })
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { template: 'rand-http' })
    assert.equal((await values(vm.ipAddress ?? '')).hooks, 1, 'the app got the POST before the clone was handed out')
    await daemon.api.call('DELETE', `/v1/vms/${vm.id}?force=true`)
    await daemon.api.call('DELETE', '/v1/templates/rand-http')
  })
})
