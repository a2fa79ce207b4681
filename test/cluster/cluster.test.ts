import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import type { NodeView } from '../../src/core/cluster.js'
import type { ServiceStatus } from '../../src/core/service.js'
import { ImageBuilder } from '../../src/guest/image-builder.js'
import { createKernelSource } from '../../src/guest/guest-kernel.js'
import { ImageStore } from '../../src/guest/image-store.js'
import { loadConfig } from '../../src/core/config.js'
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

  const service = async (i: number, name: string): Promise<ServiceStatus> => await daemons.api(i).call<ServiceStatus>('GET', `/v1/services/${name}`)
  const nodes = async (i: number): Promise<NodeView[]> => await daemons.api(i).call<NodeView[]>('GET', '/v1/nodes')
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
    await new ImageBuilder(images, createKernelSource(loadConfig(env))).build(JSON.parse(await readFile(exampleSpec('hello'), 'utf8')), join(packageRoot, 'examples', 'hello'))
    daemons = new ClusterDaemons(lab, (i) => ({ UIGNITER_NODE_LABELS: `zone=${['a', 'b', 'c'][i - 1] ?? 'x'}`, UIGNITER_NODE_MEMORY_MIB: '1024' }))
    await Promise.all([1, 2, 3].map(async (i) => { await daemons.start(i) }))
  })

  after(async () => {
    await daemons?.stopAll()
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

  it('places three replicas with anti-affinity on three nodes, fetching the image to the nodes that lack it', async () => {
    await daemons.api(3).call('PUT', '/v1/services/spread', {
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
})
