import assert from 'node:assert/strict'
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtemp, rm } from 'node:fs/promises'
import { createServer, type AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { pino } from 'pino'
import { ClusterGateway } from '../../src/cluster/cluster-gateway.js'
import { keys } from '../../src/cluster/cluster-keys.js'
import { parseRecord, RouteRecordSchema } from '../../src/cluster/cluster-records.js'
import { RouteFollower } from '../../src/cluster/route-follower.js'
import { EtcdClusterStore } from '../../src/store/etcd-cluster-store.js'
import { answerId, endpointsOf, routeFor, send, startGateway, startHttpUpstreams, until } from './gateway-fixtures.js'

/**
 * A request in flight through one node's gateway to a replica on another
 * node, when that replica dies (its node lost, its VM killed): nothing will
 * ever answer it. The leader's ClusterGateway publishes the death in the
 * route (routes/SERVICE `ended`), and every node's RouteFollower cuts what
 * its gateway has open to the endpoint, so that a GET is retried on a live
 * replica at once instead of hanging until the client gives up. Real etcd
 * (Debian's etcd-server) on loopback; real HTTP upstreams; no VMs.
 */

const log = pino({ level: 'silent' })

async function freePort (): Promise<number> {
  const server = createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address() as AddressInfo
  server.close()
  return port
}

describe('a replica that dies in a cluster: every node\'s gateway cuts and retries what it had in flight to it', { timeout: 60_000 }, () => {
  let etcd: ChildProcess
  let dir: string
  let store: EtcdClusterStore

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'uigniter-route-death-'))
    const [client, peer] = [await freePort(), await freePort()]
    etcd = spawn('/usr/bin/etcd', [
      '--name', 'm1', '--data-dir', join(dir, 'etcd'),
      '--listen-client-urls', `http://127.0.0.1:${client}`, '--advertise-client-urls', `http://127.0.0.1:${client}`,
      '--listen-peer-urls', `http://127.0.0.1:${peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`,
      '--initial-cluster', `m1=http://127.0.0.1:${peer}`
    ], { stdio: 'ignore' })
    const deadline = Date.now() + 20_000
    for (;;) {
      const health = await fetch(`http://127.0.0.1:${client}/health`, { signal: AbortSignal.timeout(1000) }).then(async (r) => await r.text()).catch(() => '')
      if (health.includes('"health":"true"')) break
      if (Date.now() > deadline) throw new Error(`etcd did not become healthy on 127.0.0.1:${client}`)
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
    store = new EtcdClusterStore({ endpoints: [`http://127.0.0.1:${client}`], leaseTtlS: 4, log })
  })

  after(async () => {
    await store?.close()
    etcd?.kill('SIGKILL')
    if (etcd !== undefined && etcd.exitCode === null) await once(etcd, 'exit')
    await rm(dir, { recursive: true, force: true })
  })

  test('a GET hanging on the dead endpoint is answered by the other one within a second; a drain (the endpoint left out, not dead) cuts nothing', async (t) => {
    await store.txn([{ put: keys.leader, value: JSON.stringify({ node: 'n2', apiUrl: 'http://127.0.0.1:1', since: new Date().toISOString() }) }])
    const epoch = (await store.get(keys.leader))?.createRevision ?? 0
    const leader = new ClusterGateway({
      store,
      epoch: () => epoch,
      peers: { load: () => new Map(), whenIdle: async () => await Promise.resolve(true) },
      nodeOf: () => 'n2',
      log
    })
    const { port: up, upstreams } = await startHttpUpstreams(t, 3, (u, req, res) => {
      if (u.id === 'u0' && req.url === '/hang') return // a VM that is gone: nobody will ever answer
      answerId(u, req, res)
    })
    const { gateway, port } = await startGateway(t)
    const follower = new RouteFollower({ store, gateway, node: 'n1', preferLocal: false, onPorts: () => {}, log })
    await follower.start()
    t.after(() => follower.close())

    await leader.configure(routeFor('api', up))
    leader.setEndpoints('api', endpointsOf(upstreams))
    await until('the follower routes to three endpoints', () => gateway.endpointStats('api').length === 3, 10_000)

    // Left out of the route, as a drain does: the request in flight to it is left to finish.
    const drained = send(port, '/hang')
    await until('the GET hangs on u0', () => gateway.inFlight('api', 'u0') === 1, 5000)
    leader.setEndpoints('api', endpointsOf(upstreams.slice(1)))
    const hitsBefore = upstreams[0]!.hits
    await until('u0 left the route', () => (gateway.endpointStats('api').find((e) => e.id === 'u0')?.requests ?? 0) === 1 && upstreams[0]!.hits === hitsBefore, 5000)
    await new Promise((resolve) => setTimeout(resolve, 300))
    const spread = await Promise.all([1, 2, 3, 4].map(async () => (await send(port, '/')).body))
    assert.ok(spread.every((id) => id !== 'u0'), `a drained endpoint takes no new request (answers: ${spread.join(' ')})`)
    assert.equal(gateway.inFlight('api', 'u0'), 1, 'an endpoint left out of the route keeps its request in flight')

    // Then it dies: the leader says so, and the follower's gateway retries the GET elsewhere.
    const diedAt = Date.now()
    leader.endpointDied('api', 'u0')
    const answer = await Promise.race([drained, new Promise<never>((_resolve, reject) => setTimeout(() => reject(new Error('the GET still hangs 5 s after the death was published')), 5000).unref())])
    const tookMs = Date.now() - diedAt
    assert.equal(answer.status, 200)
    assert.match(answer.body, /^u[12]$/)
    assert.ok(tookMs < 1000, `retried ${tookMs} ms after the death was published`)
    assert.equal(gateway.inFlight('api', 'u0'), 0)
    assert.deepEqual(gateway.endpointStats('api').map((e) => e.id).sort(), ['u1', 'u2'])

    const stored = parseRecord(RouteRecordSchema, (await store.get(keys.route('api')))?.value ?? '')
    assert.deepEqual(stored.ended, ['u0'])
    assert.deepEqual(stored.endpoints.map((e) => e.id), ['u1', 'u2'])

    // The controller lists the dead endpoint again (a stale set): it stays out; a VM that died does not come back.
    leader.setEndpoints('api', endpointsOf(upstreams))
    await new Promise((resolve) => setTimeout(resolve, 300))
    assert.deepEqual(gateway.endpointStats('api').map((e) => e.id).sort(), ['u1', 'u2'])

    // A node that reads the route only now never routes to the dead endpoint.
    const late = await startGateway(t)
    const lateFollower = new RouteFollower({ store, gateway: late.gateway, node: 'n3', preferLocal: false, onPorts: () => {}, log })
    await lateFollower.start()
    t.after(() => lateFollower.close())
    await until('the late follower has the route', () => late.gateway.endpointStats('api').length > 0, 5000)
    assert.deepEqual(late.gateway.endpointStats('api').map((e) => e.id).sort(), ['u1', 'u2'])
  })
})
