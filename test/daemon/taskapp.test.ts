import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { request } from 'node:http'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import type { ServiceStatus } from '../../src/core/service.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { createTestContext, exampleSpec, packageRoot, runCli, type TestContext } from '../helpers/fixtures.js'

interface Task { id: string, type: string, status: string, result?: unknown, worker?: string, api?: string }

/** The example application (examples/taskapp), brought up from its own file: api, worker and kv call each other only through the gateway. */
describe('the taskapp example', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let daemon: DaemonProcess
  const appFile = join(packageRoot, 'examples/taskapp/uigniter.yaml')

  async function call (method: string, path: string, body?: unknown): Promise<{ status: number, json: unknown }> {
    return await new Promise((resolve, reject) => {
      const req = request({ host: '127.0.0.1', port: daemon.gatewayPort, method, path, headers: { 'content-type': 'application/json' }, timeout: 60_000 }, (res) => {
        let text = ''
        res.setEncoding('utf8')
        res.on('data', (c: string) => { text += c })
        res.on('end', () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(text) as unknown }))
      })
      req.on('error', reject)
      req.end(body === undefined ? undefined : JSON.stringify(body))
    })
  }

  before(async () => {
    ctx = await createTestContext()
    await ctx.builder.build(JSON.parse(await readFile(exampleSpec('memcached'), 'utf8')), join(packageRoot, 'examples', 'memcached'))
    for (const role of ['api', 'worker']) {
      const spec = join(packageRoot, 'examples/taskapp', `${role}.image.json`)
      await ctx.builder.build(JSON.parse(await readFile(spec, 'utf8')), join(packageRoot, 'examples/taskapp'))
    }
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.239.${Math.floor(Math.random() * 200)}.0/24` })
    await daemon.start()
  })
  after(async () => {
    await daemon.removeEverything()
    await ctx.cleanup()
  })

  test('up; a task goes api → worker (woken from zero) → kv, all through the gateway; down', async () => {
    const up = await runCli(['up', appFile, '--timeout', '300'], { env: daemon.env })
    assert.equal(up.code, 0, up.stderr)
    const services = await daemon.api.call<ServiceStatus[]>('GET', '/v1/services?app=taskapp')
    assert.deepEqual(services.map((s) => [s.spec.name, s.desired]), [['api', 1], ['kv', 1], ['worker', 0]], 'the worker waits at zero')

    const rounds = 1000
    let digest = createHash('sha256').update('uigniter', 'utf8').digest()
    for (let i = 1; i < rounds; i++) digest = createHash('sha256').update(digest).digest()
    const done = await call('POST', '/svc/api/tasks?wait=1', { type: 'sha256', input: 'uigniter', rounds })
    assert.equal(done.status, 200, JSON.stringify(done.json))
    const task = done.json as Task
    assert.equal(task.status, 'done')
    assert.equal(task.result, digest.toString('hex'), 'the worker computed what the host computes')
    const worker = await daemon.api.call<ServiceStatus>('GET', '/v1/services/worker')
    assert.ok(worker.endpoints.some((e) => e.vm === task.worker), `a worker replica ran it (${task.worker ?? '?'})`)

    const queued = await call('POST', '/svc/api/tasks', { type: 'wordcount', input: 'one two\nthree' })
    assert.equal(queued.status, 202)
    const id = (queued.json as Task).id
    let stored: Task | undefined
    for (let i = 0; i < 100; i++) {
      const got = await call('GET', `/svc/api/tasks/${id}`)
      assert.equal(got.status, 200, 'the task is in kv')
      stored = got.json as Task
      if (stored.status === 'done') break
      await sleep(100)
    }
    assert.deepEqual(stored?.result, { words: 3, lines: 2, characters: 13 })
    assert.equal((await call('POST', '/svc/api/tasks', { type: 'nope', input: '' })).status, 400)

    const down = await runCli(['down', appFile], { env: daemon.env })
    assert.equal(down.code, 0, down.stderr)
    assert.deepEqual(await daemon.api.call('GET', '/v1/services'), [])
  })
})
