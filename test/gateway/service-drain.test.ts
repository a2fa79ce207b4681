import assert from 'node:assert/strict'
import type { ServerResponse } from 'node:http'
import { test, type TestContext } from 'node:test'
import { createLogger } from '../../src/core/logger.js'
import type { ServiceSpec } from '../../src/core/service.js'
import type { Vm } from '../../src/core/vm.js'
import type { ReplicaLauncher } from '../../src/service/replica-launcher.js'
import { ReplicaReaper } from '../../src/service/replica-reaper.js'
import { ServiceController, type ServiceEvent } from '../../src/service/service-controller.js'
import { parseAppText } from '../../src/service/service-spec.js'
import { answerId, send, type Answer, startGateway, startHttpUpstreams, until } from './gateway-fixtures.js'

/**
 * The service controller with the real gateway, real health checks and real
 * upstreams (HTTP servers on 127.0.0.X standing in for the replicas' VMs);
 * only the VM side is a stand-in (no VM boots here): its replicas are
 * adopted, its launcher starts nothing, and its stop/remove record when the
 * controller reaps a replica.
 */
async function drainSetup (t: TestContext, drainTimeoutMs: number): Promise<{
  controller: ServiceController
  spec: ServiceSpec
  port: number
  events: ServiceEvent[]
  reapedAt: Map<string, number>
  /** Answers every slow request waiting on the upstream. */
  finish: (upstreamId: string) => void
  waiting: (upstreamId: string) => number
}> {
  const waiting = new Map<string, ServerResponse[]>()
  const { port: up, upstreams } = await startHttpUpstreams(t, 2, (u, req, res) => {
    if (req.url === '/slow') waiting.set(u.id, [...(waiting.get(u.id) ?? []), res])
    else answerId(u, req, res)
  })
  const { gateway, port } = await startGateway(t)
  const spec = parseAppText(`app: shop
services:
  - name: api
    image: hello
    replicas: { min: 2, max: 2 }
    ports: [{ port: ${up}, protocol: http }]
    startPath: cold
    drainTimeoutMs: ${drainTimeoutMs}
`, 'uigniter.yaml').services[0]!
  const vms = upstreams.map((u) => ({ id: u.id, name: `api-${u.id}`, ipAddress: u.host, state: 'running', service: { name: 'api', generation: 1 } }) as unknown as Vm)
  const reapedAt = new Map<string, number>()
  const vmSide = {
    get: (id: string) => vms.find((v) => v.id === id) as Vm,
    stop: async (id: string) => await Promise.resolve(vms.find((v) => v.id === id) as Vm),
    remove: async (id: string) => {
      reapedAt.set(id, Date.now())
      return await Promise.resolve(vms.find((v) => v.id === id) as Vm)
    }
  }
  const log = createLogger('silent')
  const events: ServiceEvent[] = []
  const launcherThatStartsNothing = { cleanup: async () => { await Promise.resolve() } } as unknown as ReplicaLauncher
  const controller = new ServiceController({
    vms: vmSide,
    reaper: new ReplicaReaper(vmSide, log),
    launcher: launcherThatStartsNothing,
    gateway,
    log,
    onEvent: (e) => events.push(e),
    onEndpoints: () => {}
  }, { spec, app: 'shop', generation: 1 }, vms)
  await controller.start()
  t.after(() => controller.close())
  await until('both replicas healthy', () => controller.status().ready === 2, 10_000)
  return {
    controller, spec, port, events, reapedAt,
    finish: (id) => { for (const res of waiting.get(id) ?? []) res.writeHead(200).end(id); waiting.delete(id) },
    waiting: (id) => waiting.get(id)?.length ?? 0
  }
}

/** Two slow requests (one on each replica), then a scale down to one: which replica drains. */
async function scaleDownWithRequestsInFlight (s: Awaited<ReturnType<typeof drainSetup>>): Promise<{ drained: string, answers: Array<Promise<Answer>> }> {
  const answers = [send(s.port, '/slow'), send(s.port, '/slow')]
  await until('a request in flight on each replica', () => s.controller.status().inFlight === 2)
  await s.controller.update({ ...s.spec, replicas: { min: 1, max: 1 } }, 'shop')
  await until('a replica draining', () => s.events.some((e) => e.type === 'service.replica-draining'))
  const vm = s.events.find((e) => e.type === 'service.replica-draining')?.vm ?? ''
  return { drained: vm.replace(/^api-/, ''), answers }
}

test('drain: a replica is stopped as soon as its last in-flight request ends, not at the drain deadline', { timeout: 30_000 }, async (t) => {
  const s = await drainSetup(t, 20_000)
  const { drained, answers } = await scaleDownWithRequestsInFlight(s)
  await new Promise((resolve) => setTimeout(resolve, 500))
  assert.equal(s.reapedAt.size, 0, 'still draining: its request is in flight')
  const finishedAt = Date.now()
  s.finish(drained)
  await until('the drained replica reaped', () => s.reapedAt.has(drained), 5000)
  const took = (s.reapedAt.get(drained) ?? 0) - finishedAt
  assert.ok(took < 1000, `reaped ${took} ms after its request ended`)
  await until('stopped event', () => s.events.some((e) => e.type === 'service.replica-stopped'))
  assert.match(s.events.find((e) => e.type === 'service.replica-stopped')?.message ?? '', /after its in-flight requests finished/)
  s.finish(drained === 'u0' ? 'u1' : 'u0')
  await Promise.all(answers)
})

test('drain: at drainTimeoutMs the replica is stopped with what it still holds, and says so', { timeout: 30_000 }, async (t) => {
  const s = await drainSetup(t, 300)
  const started = Date.now()
  const { drained, answers } = await scaleDownWithRequestsInFlight(s)
  await until('the drained replica reaped', () => s.reapedAt.has(drained), 5000)
  assert.ok((s.reapedAt.get(drained) ?? 0) - started >= 300, 'not before the deadline')
  await until('stopped event', () => s.events.some((e) => e.type === 'service.replica-stopped'))
  assert.match(s.events.find((e) => e.type === 'service.replica-stopped')?.message ?? '', /with 1 request\(s\) still in flight after 300 ms/)
  // Cut when its VM went: a GET may be sent again, so it was retried on the replica that stays.
  const kept = drained === 'u0' ? 'u1' : 'u0'
  await until('the cut request retried on the kept replica', () => s.waiting(kept) === 2)
  s.finish(kept)
  assert.deepEqual((await Promise.all(answers)).map((a) => [a.status, a.body]), [[200, kept], [200, kept]])
})
