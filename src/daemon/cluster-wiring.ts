import { cpus, totalmem } from 'node:os'
import type { PlaceVm } from '../api/vm-routes.js'
import { ClusterNode } from '../cluster/cluster-node.js'
import { PeerClient } from '../cluster/peer-client.js'
import { schedule } from '../cluster/scheduler.js'
import type { ClusterImage } from '../core/cluster.js'
import type { Config } from '../core/config.js'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import type { Vm } from '../core/vm.js'
import type { Gateway } from '../gateway/gateway.js'
import { ImageFetcher } from '../guest/image-fetch.js'
import type { ImageStore } from '../guest/image-store.js'
import { ClusterRoutes } from '../net/cluster-routes.js'
import type { HostNetwork } from '../net/host-network.js'
import type { ReplicaLauncher } from '../service/replica-launcher.js'
import type { TemplateManager } from '../snapshot/template-manager.js'
import type { EtcdClusterStore } from '../store/etcd-cluster-store.js'
import type { VmManager } from '../vm/vm-manager.js'
import type { VolumeManager } from '../volume/volume-manager.js'
import type { VolumeEvent } from '../core/volume.js'
import type { TxnOp } from '../core/ports/cluster-store.js'
import { keys } from '../cluster/cluster-keys.js'

export interface ClusterWiring {
  config: Config
  store: EtcdClusterStore
  subnet: string
  accel: 'kvm' | 'tcg'
  version: string
  manager: VmManager
  images: ImageStore
  templates: TemplateManager
  launcher: ReplicaLauncher
  volumes: VolumeManager
  gateway: Gateway
  network: HostNetwork | undefined
  log: Logger
}

/** The node's API address: cluster.address with api.listen's port. */
export function nodeApiUrl (config: Config): string {
  const port = /:(\d+)$/.exec(config.api.listen)?.[1] ?? '7377'
  return `http://${config.cluster.address}:${port}`
}

/** Checks what a cluster node needs before anything starts, with what to do about each gap. */
export function checkClusterConfig (config: Config): void {
  if (config.cluster.address === '') throw new UigniterError('UIG_ERR_CONFIG_INVALID', 'cluster.address (UIGNITER_NODE_ADDRESS) is needed in a cluster: the address the other nodes reach this node on')
  if (config.api.token === undefined) throw new UigniterError('UIG_ERR_CONFIG_INVALID', 'a cluster node needs api.token (UIGNITER_TOKEN, 16+ characters, the same on every node): the nodes call each other\'s APIs with it')
  const host = /^\[?([^\]]+?)\]?:\d+$/.exec(config.api.listen)?.[1] ?? ''
  if (host !== config.cluster.address && host !== '0.0.0.0') throw new UigniterError('UIG_ERR_CONFIG_INVALID', `api.listen (${config.api.listen}) must be on cluster.address ${config.cluster.address} (or 0.0.0.0), where the other nodes call it`)
}

/** Builds this daemon's cluster node: the agent, routes, election, and the leader's part when elected. */
export function wireClusterNode (w: ClusterWiring): { node: ClusterNode, placeVm: PlaceVm } {
  const { config, log } = w
  const token = config.api.token
  const routes = w.network !== undefined ? new ClusterRoutes({ ownSubnet: w.subnet, logger: log.child({ component: 'cluster-routes' }) }) : undefined
  // The fetcher reports into the node's event stream, and the node is made with the fetcher: the holder breaks the knot.
  const holder: { node?: ClusterNode } = {}
  const fetcher = new ImageFetcher({
    images: w.images,
    log: log.child({ component: 'image-fetch' }),
    ...(token !== undefined ? { token } : {}),
    onEvent: (event) => holder.node?.services.publish({ ...event, node: config.cluster.node })
  })
  const capacity = {
    vcpus: config.cluster.capacity.vcpus ?? cpus().length * 4,
    memoryMiB: config.cluster.capacity.memoryMiB ?? Math.max(256, Math.floor(totalmem() / 1048576) - 1024)
  }
  const node = new ClusterNode({
    store: w.store,
    vms: w.manager,
    inventory: {
      images: async (): Promise<ClusterImage[]> => (await w.images.list()).map((m) => ({ ref: `${m.name}:${m.tag}`, digest: m.digest, vcpus: m.vcpus, memoryMiB: m.memoryMiB, init: m.init !== null })),
      templates: async () => (await w.templates.list()).map((t) => t.name)
    },
    startReplica: async (spec, generation, name, index) => await w.launcher.start(spec, generation, name, index),
    ensureImage: async (digest, ref) => { await ensureImage(digest, ref) },
    identity: {
      name: config.cluster.node,
      apiUrl: nodeApiUrl(config),
      underlay: config.cluster.address,
      subnet: w.subnet,
      labels: config.cluster.labels,
      accel: w.accel,
      capacity,
      version: w.version,
      startedAt: new Date().toISOString()
    },
    gateway: w.gateway,
    allowGatewayPorts: async (ports) => { await w.network?.allowHostPorts(ports) },
    syncRoutes: routes !== undefined
      ? async (peers) => {
        await routes.sync(peers)
        await w.network?.setClusterNodes(peers.map((p) => p.via))
      }
      : null,
    token,
    scoring: config.cluster.scoring,
    preferLocalEndpoints: config.cluster.preferLocalEndpoints,
    gatewayHttpPort: w.gateway.httpPort,
    log: log.child({ component: 'cluster' })
  })
  holder.node = node
  const clusterNode = node
  const peers = new PeerClient(token)
  const ensureImage = async (digest: string, ref: string): Promise<void> => {
    const holders = clusterNode.view.nodeViews().filter((n) => n.state !== 'lost' && n.name !== config.cluster.node && n.images.some((i) => i.digest === digest)).map((n) => n.apiUrl)
    await fetcher.ensure(digest, holders, ref === '' ? undefined : ref.includes(':') ? ref : `${ref}:latest`)
  }
  /**
   * A VM outside any service: on the node it names, or on the one the
   * scheduler picks for its image's resources; the node that runs it
   * fetches the image first when it lacks it.
   */
  const placeVm: PlaceVm = async (request) => {
    const known = clusterNode.view.nodeViews().flatMap((n) => n.images).find((i) => i.ref === request.image || i.ref === `${request.image ?? ''}:latest`)
    let target = request.node
    if (target === undefined) {
      const image = known
      if (image === undefined || request.template !== undefined) return undefined
      const volumeNodes: Record<string, string> = {}
      for (const v of request.volumes ?? []) {
        const home = clusterNode.view.volumeNode(v.name)
        if (home !== undefined) volumeNodes[v.name] = home
      }
      const decision = schedule({
        replica: request.name ?? '(unnamed VM)',
        service: null,
        resources: { vcpus: request.vcpus ?? image.vcpus, memoryMiB: request.memoryMiB ?? image.memoryMiB },
        imageDigest: image.digest,
        volumeNodes,
        rules: { nodeSelector: {}, affinity: { required: [], preferred: [] }, antiAffinity: { required: [], preferred: [] }, spread: false }
      }, clusterNode.view.schedulerNodes(), { scoring: config.cluster.scoring })
      clusterNode.services.publish({ type: decision.placed ? 'cluster.placed' : 'cluster.unschedulable', service: null, replica: request.name ?? null, message: decision.message, at: new Date().toISOString() })
      if (!decision.placed) throw new UigniterError('UIG_ERR_CLUSTER_UNSCHEDULABLE', decision.message)
      target = decision.node
    }
    if (target === config.cluster.node) {
      if (known !== undefined) await ensureImage(known.digest, known.ref)
      return undefined
    }
    const peer = clusterNode.view.nodeViews().find((n) => n.name === target)
    if (peer === undefined) throw new UigniterError('UIG_ERR_NODE_NOT_FOUND', `no node of the cluster is named "${target}"; "uigniter node ls" lists them`)
    if (peer.state === 'lost') throw new UigniterError('UIG_ERR_NODE_UNREACHABLE', `node ${target} is lost (its lease expired); choose another node`)
    const vm = await peers.call<Vm>(peer.apiUrl, 'POST', '/v1/vms', { ...request, node: target }, 300_000)
    return { ...vm, node: target }
  }
  publishVolumeHomes(w, clusterNode)
  return { node: clusterNode, placeVm }
}

/**
 * Tells the cluster which volumes live on this node (volumes/NAME, not
 * leased: a volume stays where its data is while its node is away), so that
 * the scheduler places their replicas here. Written at each create and
 * delete, and all of them again every 30 s, which also heals a write lost
 * while etcd was out of reach.
 */
function publishVolumeHomes (w: ClusterWiring, node: ClusterNode): void {
  const self = w.config.cluster.node
  const sync = async (): Promise<void> => {
    const ops: TxnOp[] = []
    for (const v of w.volumes.records()) ops.push({ put: keys.volume(v.name), value: JSON.stringify({ name: v.name, node: self, sizeMiB: v.sizeMiB }) })
    for (const [key, home] of node.view.volumes.items) {
      if (home.node === self && !ops.some((op) => 'put' in op && op.put === key)) ops.push({ delete: key })
    }
    if (ops.length > 0) await w.store.txn(ops)
  }
  const report = (err: unknown): void => { w.log.warn({ err }, 'publishing this node\'s volumes to the cluster failed; it is tried again within 30 s') }
  w.volumes.on('volume', (event: VolumeEvent) => {
    if (event.type === 'volume.created' || event.type === 'volume.deleted') void sync().catch(report)
  })
  void sync().catch(report)
  setInterval(() => { void sync().catch(report) }, 30_000).unref()
}
