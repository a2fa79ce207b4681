import assert from 'node:assert/strict'
import { cp, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import type { NodeView } from '../../src/core/cluster.js'
import type { ServiceStatus } from '../../src/core/service.js'
import { ImageBuilder } from '../../src/guest/image-builder.js'
import { createKernelSource } from '../../src/guest/guest-kernel.js'
import { ImageStore } from '../../src/guest/image-store.js'
import { loadConfig } from '../../src/core/config.js'
import type { Vm } from '../../src/core/vm.js'
import type { Volume } from '../../src/core/volume.js'
import { run } from '../../src/core/exec.js'
import { buildGatewayCaller } from '../helpers/gateway-caller.js'
import { ClusterDaemons } from '../helpers/cluster-daemons.js'
import { startClusterLab, type ClusterLab } from '../helpers/cluster-lab.js'
import { exampleSpec, packageRoot } from '../helpers/fixtures.js'

/**
 * A cluster of three nodes on this machine: three network namespaces on an
 * underlay, each with its own daemon, data dir, bridge, nft table and
 * subnet, and three etcd members. Real VMs (hello guests), kept few.
 */
describe('a cluster of three nodes on etcd', { timeout: 900_000 }, () => {
  let lab: ClusterLab
  let daemons: ClusterDaemons
  const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))

  async function until<T> (what: string, probe: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
    const deadline = Date.now() + timeoutMs
    let last: unknown
    while (Date.now() < deadline) {
      try {
        const v = await probe()
        if (v !== undefined) return v
      } catch (err) { last = err }
      await sleep(250)
    }
    throw new Error(`${what}: not within ${timeoutMs} ms${last !== undefined ? ` (last error: ${(last as Error).message})` : ''}`)
  }

  /** One API call to node i, bounded: a frozen or dead node must fail the probe, not hang the test. */
  async function call<T> (i: number, method: string, path: string, body?: unknown, timeoutMs = 15_000): Promise<T> {
    let timer: NodeJS.Timeout | undefined
    try {
      return await Promise.race([
        daemons.api(i).call<T>(method, path, body),
        new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`n${i} did not answer ${method} ${path} within ${timeoutMs} ms`)), timeoutMs) })
      ])
    } finally { clearTimeout(timer) }
  }
  const service = async (i: number, name: string): Promise<ServiceStatus> => await call<ServiceStatus>(i, 'GET', `/v1/services/${name}`)
  const nodes = async (i: number): Promise<NodeView[]> => await call<NodeView[]>(i, 'GET', '/v1/nodes')
  const readyOn = async (i: number, name: string, want: number): Promise<ServiceStatus | undefined> => {
    const s = await service(i, name)
    return s.endpoints.filter((e) => e.health === 'healthy' && e.vm !== null).length >= want ? s : undefined
  }
  /** One GET, its body; undefined for anything but a 200. */
  const get = async (url: string, timeoutMs = 5000): Promise<string | undefined> => {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) })
    const body = await res.text()
    return res.status === 200 ? body : undefined
  }
  const HEALTH = { intervalMs: 300, timeoutMs: 2000, unhealthyThreshold: 3 }

  before(async () => {
    lab = await startClusterLab({ nodes: 3 })
    // The image is built on n1 only: the other nodes fetch it by digest when they are given a replica.
    const env = { ...process.env, UIGNITER_DATA_DIR: lab.node(1).dataDir }
    const images = new ImageStore(lab.node(1).dataDir)
    const builder = new ImageBuilder(images, createKernelSource(loadConfig(env)))
    await builder.build(JSON.parse(await readFile(exampleSpec('hello'), 'utf8')), join(packageRoot, 'examples', 'hello'))
    const caller = await buildGatewayCaller(join(lab.dir, 'caller'))
    await builder.build({ name: 'caller', source: { kind: 'elf', path: caller, args: [] }, memoryMiB: 64, ports: [{ port: 8080, protocol: 'http' }] })
    daemons = new ClusterDaemons(lab, (i) => ({ UIGNITER_NODE_LABELS: `zone=${['a', 'b', 'c'][i - 1] ?? 'x'}`, UIGNITER_NODE_MEMORY_MIB: '1024' }))
    await Promise.all([1, 2, 3].map(async (i) => { await daemons.start(i) }))
  })

  after(async () => {
    await daemons?.stopAll()
    // The nodes' logs outlive the lab, for a failure to be read: /tmp/uigniter-cluster-test-logs.
    if (lab !== undefined) await cp(join(lab.dir, 'logs'), '/tmp/uigniter-cluster-test-logs', { recursive: true, force: true }).catch(() => {})
    await lab?.close()
  })

  it('joins three nodes under one leader, each with its subnet and labels', async () => {
    const views = await until('three ready nodes and a leader', async () => {
      const v = await nodes(2)
      return v.length === 3 && v.every((n) => n.state === 'ready') && v.filter((n) => n.leader).length === 1 ? v : undefined
    })
    assert.deepEqual(views.map((n) => [n.name, n.subnet, n.labels.zone]), [['n1', '10.78.1.0/24', 'a'], ['n2', '10.78.2.0/24', 'b'], ['n3', '10.78.3.0/24', 'c']])
    assert.equal(views[0]?.capacity.memoryMiB, 1024)
    assert.ok(views[0]?.images.some((i) => i.ref === 'hello:latest'))
  })

  it('ignores records in etcd that do not parse: every node goes on as before', async () => {
    const put = async (key: string, value: string): Promise<void> => { await run('etcdctl', [`--endpoints=${lab.etcdEndpoints.join(',')}`, 'put', key, value]) }
    await put('/uigniter/nodes/evil', 'not json')
    await put('/uigniter/placements/n1/evil', JSON.stringify({ replica: 'evil', node: 'n1' }))
    await put('/uigniter/routes/evil', JSON.stringify({ route: { service: 'evil' }, endpoints: 'all' }))
    await put('/uigniter/replicas/n2/evil', '{"vm":{"id":1}}')
    await sleep(1000)
    for (const i of [1, 2, 3]) {
      assert.equal((await nodes(i)).length, 3)
      assert.deepEqual(await call(i, 'GET', '/healthz'), { status: 'ok' })
    }
    assert.equal(await get(`${lab.node(1).gatewayUrl}/svc/evil/`), undefined, "no route from a record that does not parse")
    for (const key of ['/uigniter/nodes/evil', '/uigniter/placements/n1/evil', '/uigniter/routes/evil', '/uigniter/replicas/n2/evil']) await run('etcdctl', [`--endpoints=${lab.etcdEndpoints.join(',')}`, 'del', key])
  })

  it('places three replicas with anti-affinity on three nodes, fetching the image to the nodes that lack it', async () => {
    await call(3, 'PUT', '/v1/services/spread', {
      image: 'hello', replicas: { min: 3 }, ports: [{ port: 8080 }], healthCheck: HEALTH, startPath: 'cold',
      resources: { memoryMiB: 300 }, placement: { antiAffinity: { required: ['spread'] } }
    })
    const s = await until('spread ready 3/3', async () => await readyOn(1, 'spread', 3), 180_000)
    const where = s.endpoints.filter((e) => e.vm !== null).map((e) => e.node).sort()
    assert.deepEqual(where, ['n1', 'n2', 'n3'])
    const views = await nodes(1)
    for (const n of views) assert.ok(n.images.some((i) => i.ref === 'hello:latest'), `${n.name} holds the image`)
    // Every replica answers through any node's gateway.
    const answer = await until('an answer through n2\'s gateway', async () => await get(`${lab.node(2).gatewayUrl}/svc/spread/`), 10_000)
    assert.match(answer, /Hello from uigniter/)
  })

  it('keeps a replica that fits no node pending, with each node\'s reason, and places it once a node frees room', async () => {
    await call(2, 'PUT', '/v1/services/big', { image: 'hello', replicas: { min: 1 }, ports: [{ port: 8080 }], healthCheck: HEALTH, startPath: 'cold', resources: { memoryMiB: 800 } })
    const pending = await until('big pending with reasons', async () => {
      const s = await service(1, 'big')
      return s.message?.includes('fits no node') === true ? s : undefined
    }, 30_000)
    for (const name of ['n1', 'n2', 'n3']) assert.match(pending.message ?? '', new RegExp(`${name}: memory [0-9,]+ MiB free < 800 MiB asked`))
    await call(1, 'DELETE', '/v1/services/spread')
    const placed = await until('big placed once spread freed its room', async () => await readyOn(1, 'big', 1), 90_000)
    assert.equal(placed.endpoints.filter((e) => e.vm !== null).length, 1)
    await call(1, 'DELETE', '/v1/services/big')
  })

  it('holds a replica with a volume to the node its volume lives on: pinned elsewhere it is pending, and the volume outlives the service', async () => {
    const spec = {
      image: 'hello', replicas: { min: 1 }, ports: [{ port: 8080 }], healthCheck: HEALTH, resources: { memoryMiB: 200 },
      volumes: [{ name: 'data', guestPath: '/data', perReplica: true, sizeMiB: 32 }]
    }
    await call(2, 'PUT', '/v1/services/stateful', spec)
    const s = await until('stateful ready', async () => await readyOn(1, 'stateful', 1), 90_000)
    const home = s.endpoints.find((e) => e.vm !== null)?.node ?? ''
    const homeIndex = Number(home.slice(1))
    const volume = (await call<Volume[]>(homeIndex, 'GET', '/v1/volumes')).find((v) => v.name === 'stateful-data-0')
    assert.equal(volume?.node, home, 'made on the node its replica landed on')
    assert.equal(volume?.attachments.length, 1)
    await call(1, 'DELETE', '/v1/services/stateful')
    const other = ['n1', 'n2', 'n3'].find((n) => n !== home) ?? ''
    await call(1, 'PUT', '/v1/services/stateful', { ...spec, placement: { node: other } })
    const pending = await until('stateful pending for its volume', async () => {
      const status = await service(1, 'stateful')
      return status.message?.includes('fits no node') === true ? status : undefined
    }, 30_000)
    assert.match(pending.message ?? '', new RegExp(`${other}: volume stateful-data-0 lives on node ${home}`))
    // Unpinned, it goes back to its volume.
    await call(1, 'PUT', '/v1/services/stateful', spec)
    const back = await until('stateful back on its volume\'s node', async () => await readyOn(1, 'stateful', 1), 90_000)
    assert.deepEqual(back.endpoints.filter((e) => e.vm !== null).map((e) => e.node), [home])
    await call(1, 'DELETE', '/v1/services/stateful')
    await until('the volume detached', async () => {
      const v = (await call<Volume[]>(homeIndex, 'GET', '/v1/volumes')).find((x) => x.name === 'stateful-data-0')
      return v !== undefined && v.attachments.length === 0 ? v : undefined
    }, 30_000)
    await call(homeIndex, 'DELETE', '/v1/volumes/stateful-data-0')
  })

  let backendNodes: string[] = []
  it('lets a replica on one node call, by name through its own gateway, a service whose replicas run on the two others', async () => {
    await call(1, 'PUT', '/v1/services/caller', { image: 'caller', replicas: { min: 1 }, ports: [{ port: 8080 }], healthCheck: HEALTH, startPath: 'cold', placement: { node: 'n1' } })
    await call(1, 'PUT', '/v1/services/backend', {
      image: 'hello', replicas: { min: 2 }, ports: [{ port: 8080 }], healthCheck: HEALTH,
      placement: { antiAffinity: { required: ['backend'], preferred: [{ service: 'caller', weight: 100 }] } }
    })
    const caller = await until('caller ready on n1', async () => await readyOn(2, 'caller', 1), 120_000)
    assert.equal(caller.endpoints[0]?.node, 'n1')
    const backend = await until('backend ready 2/2', async () => await readyOn(3, 'backend', 2), 180_000)
    backendNodes = backend.endpoints.filter((e) => e.vm !== null).map((e) => e.node ?? '').sort()
    assert.deepEqual(backendNodes, ['n2', 'n3'])
    const seen = new Set<string>()
    for (let i = 0; i < 12 && seen.size < 2; i++) {
      const answer = await until('the caller\'s answer', async () => await get(`${lab.node(1).gatewayUrl}/svc/caller/backend`, 10_000), 30_000)
      const host = /Hello from uigniter! \((.+)\)/.exec(answer)?.[1]
      assert.ok(host !== undefined, `the caller relayed a backend's answer, not: ${answer}`)
      seen.add(host)
    }
    assert.equal(seen.size, 2, 'both backend replicas answered the caller')
  })

  /** GETs through a node's gateway until stopped: how many there were, and which failed. */
  function loadThrough (i: number, path: string): { stop: () => Promise<{ ok: number, failed: string[] }> } {
    let running = true
    const failed: string[] = []
    let ok = 0
    const loop = (async () => {
      while (running) {
        try {
          const res = await fetch(`${lab.node(i).gatewayUrl}${path}`, { signal: AbortSignal.timeout(15_000) })
          await res.text()
          if (res.status === 200) ok++
          else failed.push(`status ${res.status}`)
        } catch (err) { failed.push((err as Error).message) }
        await sleep(20)
      }
    })()
    return { stop: async () => { running = false; await loop; return { ok, failed } } }
  }

  /** SIGKILL of every QEMU in node i's namespace (its etcd member lives there too and stays). */
  async function killQemus (i: number): Promise<number> {
    const { stdout } = await lab.exec(i, 'ip', ['netns', 'pids', lab.node(i).ns]).catch(() => ({ stdout: '' }))
    let n = 0
    for (const pid of stdout.split(/\s+/).filter((p) => /^\d+$/.test(p))) {
      const comm = await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '')
      if (comm.startsWith('qemu')) { process.kill(Number(pid), 'SIGKILL'); n++ }
    }
    return n
  }

  it('replaces a lost node\'s replicas on the others within the lease TTL and a start, with no failed GET through a surviving gateway', async (t) => {
    const victim = Number((backendNodes[1] ?? 'n3').slice(1))
    const other = victim === 1 ? 2 : 1
    const load = loadThrough(other, '/svc/backend/')
    await sleep(500)
    t.after(async () => { await daemons.ensureRunning(victim) })
    const killedAt = Date.now()
    daemons.kill(victim)
    assert.ok(await killQemus(victim) >= 1)
    const back = await until('backend 2/2 again without the lost node', async () => {
      const s = await readyOn(other, 'backend', 2)
      return s !== undefined && s.endpoints.every((e) => e.node !== `n${victim}`) ? s : undefined
    }, 120_000)
    const failoverMs = Date.now() - killedAt
    const { ok, failed } = await load.stop()
    const views = await nodes(other)
    assert.equal(views.find((n) => n.name === `n${victim}`)?.state, 'lost')
    assert.deepEqual(failed, [], `GETs failed during the failover (${ok} succeeded)`)
    assert.ok(ok > 20)
    backendNodes = back.endpoints.filter((e) => e.vm !== null).map((e) => e.node ?? '').sort()
    t.diagnostic(`failover: ${failoverMs} ms (lease TTL 4 s), ${ok} GETs, none failed`)
    // The node comes back: its dead replica's record is removed, not run again (its placement moved away).
    await daemons.start(victim)
    await until('the returned node is ready and holds no replica of backend', async () => {
      const v = (await nodes(other)).find((n) => n.name === `n${victim}`)
      const vms = await call<Vm[]>(victim, 'GET', '/v1/vms?all=true')
      return v?.state === 'ready' && !vms.some((vm) => vm.service?.name === 'backend') ? true : undefined
    }, 60_000)
  })

  it('fences a node that comes back after it was declared lost: its stale replica stops', async (t) => {
    const victim = Number((backendNodes[0] ?? 'n2').slice(1))
    const other = victim === 1 ? 2 : 1
    const before = (await service(other, 'backend')).endpoints.find((e) => e.node === `n${victim}`)
    assert.ok(before !== undefined)
    t.after(async () => { await daemons.ensureRunning(victim) })
    // Frozen, as a node cut off from etcd is: its VMs run on, its lease runs out.
    daemons.kill(victim, 'SIGSTOP')
    await until('backend 2/2 without the frozen node', async () => {
      const s = await readyOn(other, 'backend', 2)
      return s !== undefined && s.endpoints.every((e) => e.node !== `n${victim}`) ? s : undefined
    }, 120_000)
    assert.ok(await get(`http://${before.host}:8080/`) !== undefined, 'the stale replica still runs while its node is cut off')
    daemons.kill(victim, 'SIGCONT')
    await until('the stale replica stopped once its node returned', async () => {
      const vms = await call<Vm[]>(victim, 'GET', '/v1/vms?all=true')
      return vms.some((vm) => vm.id === before.id) ? undefined : true
    }, 60_000)
    await assert.rejects(get(`http://${before.host}:8080/`, 2000))
    backendNodes = (await service(other, 'backend')).endpoints.filter((e) => e.vm !== null).map((e) => e.node ?? '').sort()
  })

  it('elects a new leader within the TTL when the leader dies, and services keep reconciling', async (t) => {
    const leader = (await nodes(1)).find((n) => n.leader)?.name ?? ''
    const dead = Number(leader.slice(1))
    const survivor = dead === 1 ? 2 : 1
    t.after(async () => { await daemons.ensureRunning(dead) })
    const killedAt = Date.now()
    daemons.kill(dead)
    const next = await until('a new leader', async () => (await nodes(survivor)).find((n) => n.leader && n.name !== leader), 30_000)
    const takeoverMs = Date.now() - killedAt
    t.diagnostic(`leader ${leader} killed; ${next.name} leads after ${takeoverMs} ms (lease TTL 4 s)`)
    assert.ok(takeoverMs < 4000 + 3000, `takeover took ${takeoverMs} ms`)
    // A replica killed now is replaced by the new leader's controller.
    const s = await until('backend 2/2 under the new leader', async () => await readyOn(survivor, 'backend', 2), 120_000)
    const target = s.endpoints.find((e) => e.vm !== null && e.node !== leader)
    assert.ok(target !== undefined)
    const vm = await call<Vm>(Number((target.node ?? 'n1').slice(1)), 'GET', `/v1/vms/${target.id}`)
    process.kill(vm.pid ?? 0, 'SIGKILL')
    await until('the killed replica replaced', async () => {
      const now = await readyOn(survivor, 'backend', 2)
      return now !== undefined && !now.endpoints.some((e) => e.id === target.id) ? now : undefined
    }, 120_000)
    await daemons.start(dead)
    await until('the old leader is back as a follower', async () => (await nodes(dead)).find((n) => n.name === leader && n.state === 'ready' && !n.leader), 60_000)
  })

  it('rides out etcd: one member of three lost changes nothing; all three lost keeps serving and refuses writes; back, it reconciles', async () => {
    const spec = (await service(1, 'backend')).spec
    await lab.etcd.kill(1)
    await lab.etcd.waitHealthy()
    await call(2, 'PUT', '/v1/services/backend', { ...spec, drainTimeoutMs: 5000 })
    assert.equal((await service(3, 'backend')).spec.drainTimeoutMs, 5000)
    lab.etcd.start(1)
    await lab.etcd.waitHealthy()
    await Promise.all([1, 2, 3].map(async (j) => { await lab.etcd.kill(j) }))
    const load = loadThrough(1, '/svc/backend/')
    await sleep(6000)
    await assert.rejects(call(1, 'PUT', '/v1/services/backend', { ...spec, drainTimeoutMs: 6000 }), (err: Error & { code?: string }) => err.code === 'UIG_ERR_CLUSTER_UNAVAILABLE')
    const { ok, failed } = await load.stop()
    assert.deepEqual(failed, [], `GETs failed while etcd was down (${ok} succeeded)`)
    assert.ok(ok > 20)
    for (const j of [1, 2, 3]) lab.etcd.start(j)
    await lab.etcd.waitHealthy()
    await until('writes work again', async () => await call(1, 'PUT', '/v1/services/backend', { ...spec, drainTimeoutMs: 7000 }).then(() => true), 60_000)
    await until('backend 2/2 after etcd came back', async () => await readyOn(1, 'backend', 2), 120_000)
    const views = await nodes(1)
    assert.deepEqual(views.map((n) => n.state), ['ready', 'ready', 'ready'])
    assert.equal(views.filter((n) => n.leader).length, 1)
  })

  it('drains a node: every replica moves off it with no failed request, and it stays cordoned', async () => {
    const s = await service(1, 'backend')
    const from = s.endpoints.find((e) => e.vm !== null && e.node !== 'n1')?.node ?? 'n2'
    const load = loadThrough(1, '/svc/backend/')
    await sleep(300)
    const answer = await call<{ moved: number, remaining: string[] }>(2, 'POST', `/v1/nodes/${from}/drain?timeoutS=180`, undefined, 200_000)
    const { ok, failed } = await load.stop()
    assert.equal(answer.moved, 1)
    assert.deepEqual(answer.remaining, [])
    assert.deepEqual(failed, [], `requests failed during the drain (${ok} succeeded)`)
    const after = await until('backend 2/2 off the drained node', async () => {
      const now = await readyOn(1, 'backend', 2)
      return now !== undefined && now.endpoints.every((e) => e.node !== from) ? now : undefined
    }, 60_000)
    assert.equal(after.endpoints.filter((e) => e.vm !== null).length, 2)
    assert.equal((await nodes(1)).find((n) => n.name === from)?.state, 'cordoned')
    await call(3, 'POST', `/v1/nodes/${from}/uncordon`)
    assert.equal((await nodes(1)).find((n) => n.name === from)?.state, 'ready')
  })

  it('wakes a service scaled to zero from any node\'s gateway: the held request is answered by a replica the leader placed', async () => {
    await call(1, 'PUT', '/v1/services/lazy', { image: 'hello', replicas: { min: 0, max: 1 }, ports: [{ port: 8080 }], healthCheck: HEALTH, startPath: 'cold', autoscale: { idleToZeroMs: 60_000 } })
    assert.equal((await service(2, 'lazy')).endpoints.length, 0)
    const follower = (await nodes(1)).find((n) => !n.leader)?.name ?? 'n1'
    const url = `${lab.node(Number(follower.slice(1))).gatewayUrl}/svc/lazy/`
    // The follower's gateway learns the route from etcd a moment after the PUT; until then it answers 404 at once.
    // The first request it does route is held while the leader places a replica, and answered by it.
    let res = await fetch(url, { signal: AbortSignal.timeout(60_000) })
    for (const deadline = Date.now() + 10_000; res.status === 404 && Date.now() < deadline;) {
      await sleep(100)
      res = await fetch(url, { signal: AbortSignal.timeout(60_000) })
    }
    assert.equal(res.status, 200)
    assert.match(await res.text(), /Hello from uigniter/)
    const s = await service(1, 'lazy')
    assert.equal(s.endpoints.filter((e) => e.health === 'healthy').length, 1)
    await call(1, 'DELETE', '/v1/services/lazy')
  })
})
