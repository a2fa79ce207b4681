import { request as httpRequest } from 'node:http'
import { Type } from '@sinclair/typebox'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { NODE_NAME, type NodeView } from '../core/cluster.js'
import { UigniterError } from '../core/errors.js'
import type { Vm } from '../core/vm.js'
import type { ClusterNode } from '../cluster/cluster-node.js'
import { keys } from '../cluster/cluster-keys.js'
import { PeerClient } from '../cluster/peer-client.js'
import { ErrorBodySchema } from './errors.js'

const NameParams = Type.Object({ name: Type.String({ pattern: NODE_NAME.source }) })
const errors = { 400: ErrorBodySchema, 404: ErrorBodySchema, 409: ErrorBodySchema, 503: ErrorBodySchema }
/** Requests only the leader can answer: a follower forwards them. */
const LEADER_ONLY = /^\/v1\/(services|apps|registry)(\/|\?|$)|^\/v1\/nodes\/[^/]+\/drain(\?|$)|^\/v1\/cluster\/wake\//

const ResourcesSchema = Type.Object({ vcpus: Type.Number(), memoryMiB: Type.Number() })
export const NodeViewSchema = Type.Object({
  name: Type.String(),
  apiUrl: Type.String(),
  underlay: Type.String(),
  subnet: Type.String(),
  labels: Type.Record(Type.String(), Type.String()),
  accel: Type.String(),
  capacity: ResourcesSchema,
  allocated: ResourcesSchema,
  vms: Type.Integer(),
  images: Type.Array(Type.Object({ ref: Type.String(), digest: Type.String(), vcpus: Type.Number(), memoryMiB: Type.Number(), init: Type.Boolean() })),
  templates: Type.Array(Type.String()),
  version: Type.String(),
  startedAt: Type.String(),
  state: Type.Union([Type.Literal('ready'), Type.Literal('cordoned'), Type.Literal('lost')]),
  cordoned: Type.Boolean(),
  leader: Type.Boolean()
})

/**
 * A single host answers the cluster routes with UIG_ERR_CLUSTER_NOT_ENABLED,
 * so that `uigniter node ls` says why instead of "no such route".
 */
export function singleHostClusterRoutes () {
  return async function singleHost (app: FastifyInstance): Promise<void> {
    const refuse = async (): Promise<never> => { throw new UigniterError('UIG_ERR_CLUSTER_NOT_ENABLED', 'this daemon runs a single host; start it with cluster.etcd (UIGNITER_ETCD) to join a cluster (docs/cluster.md)') }
    app.get('/v1/nodes', { schema: { tags: ['cluster'], summary: 'A cluster only', response: errors } }, refuse)
    app.get('/v1/nodes/:name', { schema: { tags: ['cluster'], summary: 'A cluster only', response: errors } }, refuse)
    for (const verb of ['cordon', 'uncordon', 'drain']) app.post(`/v1/nodes/:name/${verb}`, { schema: { tags: ['cluster'], summary: 'A cluster only', response: errors } }, refuse)
  }
}

/**
 * The cluster's routes: nodes (list, inspect, cordon, uncordon, drain), the
 * cluster-wide VM list, and what the nodes ask of each other (gateway load,
 * a drain of one endpoint, a wake). On a follower, requests only the leader
 * can answer (services, applications, the registry, drains, wakes) are
 * forwarded to it as they are, streams included.
 */
export function clusterRoutes (node: ClusterNode, token: string | undefined) {
  const peers = new PeerClient(token)
  const plugin = async function cluster (app: FastifyInstance): Promise<void> {
    app.addHook('onRequest', async (request, reply) => {
      if (!LEADER_ONLY.test(request.url) || node.services.isLeader) return
      const leader = node.services.leader
      if (!node.storeReachable) {
        throw new UigniterError('UIG_ERR_CLUSTER_UNAVAILABLE', 'this node cannot reach the cluster store (etcd), so no change can be made; running VMs and the gateways keep serving. Try again once etcd has a quorum')
      }
      if (leader === null || leader.node === node.name) {
        throw new UigniterError('UIG_ERR_CLUSTER_NO_LEADER', 'the cluster has no leader right now (an election is under way, or etcd has no quorum); try again within the lease TTL')
      }
      await forward(request, reply, leader.apiUrl, token)
    })

    app.get('/v1/nodes', {
      schema: { tags: ['cluster'], summary: 'Every node of the cluster: state, labels, capacity, allocated resources, VMs, and which one leads', response: { 200: Type.Array(NodeViewSchema), ...errors } }
    }, async () => node.view.nodeViews())

    app.get<{ Params: { name: string } }>('/v1/nodes/:name', {
      schema: { tags: ['cluster'], summary: 'One node, with the replicas placed on it', params: NameParams }
    }, async (request) => {
      const view = find(node, request.params.name)
      const placements = node.view.placementsOn(view.name).map((p) => ({
        replica: p.replica, service: p.service, generation: p.generation, epoch: p.epoch, at: p.at,
        state: node.view.report(p.node, p.replica)?.vm?.state ?? 'placed'
      }))
      return { ...view, placements }
    })

    for (const verb of ['cordon', 'uncordon'] as const) {
      app.post<{ Params: { name: string } }>(`/v1/nodes/:name/${verb}`, {
        schema: { tags: ['cluster'], summary: verb === 'cordon' ? 'No new replica is placed on the node; those it runs stay' : 'The node takes new replicas again', params: NameParams, response: { 200: NodeViewSchema, ...errors } }
      }, async (request) => {
        const view = find(node, request.params.name)
        await node.agent.write(verb === 'cordon' ? [{ put: keys.cordon(view.name), value: new Date().toISOString() }] : [{ delete: keys.cordon(view.name) }])
        return { ...view, cordoned: verb === 'cordon', state: view.state === 'lost' ? 'lost' : verb === 'cordon' ? 'cordoned' : 'ready' }
      })
    }

    app.post<{ Params: { name: string }, Querystring: { timeoutS: number } }>('/v1/nodes/:name/drain', {
      schema: {
        tags: ['cluster'],
        summary: 'Cordons the node, then moves each of its replicas elsewhere (a new one first, then the old one drained); answers when none is left or at the timeout',
        params: NameParams,
        querystring: Type.Object({ timeoutS: Type.Integer({ minimum: 1, maximum: 3600, default: 300 }) }, { additionalProperties: false })
      }
    }, async (request) => {
      const view = find(node, request.params.name)
      await node.agent.write([{ put: keys.cordon(view.name), value: new Date().toISOString() }])
      // Evicted again at each round: a controller that adopts a replica of the node later (a leader
      // that just took over) moves it too; replicas already moving are not counted twice.
      let moving = 0
      const deadline = Date.now() + request.query.timeoutS * 1000
      for (;;) {
        if (node.services.isLeader) moving += node.services.evict((vm) => vm.node === view.name)
        if (node.view.placementsOn(view.name).length === 0 || Date.now() >= deadline) break
        await new Promise((resolve) => setTimeout(resolve, 250))
      }
      const remaining = node.view.placementsOn(view.name).map((p) => p.replica)
      return { node: view.name, moved: moving, remaining, cordoned: true }
    })

    app.get('/v1/cluster/vms', {
      schema: { tags: ['cluster'], summary: 'The VMs of every live node, each with its node (a node that does not answer is named in `unreachable`)' }
    }, async () => {
      const nodes = node.view.nodeViews().filter((n) => n.state !== 'lost')
      const unreachable: string[] = []
      const lists = await Promise.all(nodes.map(async (n) => await peers.call<Vm[]>(n.apiUrl, 'GET', '/v1/vms?all=true', undefined, 3000)
        .then((vms) => vms.map((vm) => ({ ...vm, node: n.name })), () => { unreachable.push(n.name); return [] })))
      return { vms: lists.flat(), unreachable }
    })

    app.get('/v1/cluster/load', { schema: { tags: ['cluster'], summary: 'This node\'s gateway load per service (the leader reads it every second)' } }, async () => node.localLoads())

    app.post<{ Body: { service: string, endpoint: string, timeoutMs: number } }>('/v1/cluster/drain', {
      schema: {
        tags: ['cluster'],
        summary: 'This node\'s gateway stops routing to the endpoint and answers once nothing is in flight to it (the leader asks every node before it stops a replica)',
        body: Type.Object({ service: Type.String({ maxLength: 64 }), endpoint: Type.String({ maxLength: 128 }), timeoutMs: Type.Integer({ minimum: 0, maximum: 600_000 }) }, { additionalProperties: false })
      }
    }, async (request) => ({ idle: await node.routes.drain(request.body.service, request.body.endpoint, request.body.timeoutMs) }))

    app.post<{ Params: { service: string } }>('/v1/cluster/wake/:service', {
      schema: { tags: ['cluster'], summary: 'A node\'s gateway holds a request for the service: the leader starts a replica if it has none', params: Type.Object({ service: Type.String({ maxLength: 64 }) }) }
    }, async (request) => {
      node.services.wake(request.params.service)
      return { woken: request.params.service }
    })
  }
  // Not encapsulated: the forwarding hook must see the service routes, which other plugins register.
  Object.assign(plugin, { [Symbol.for('skip-override')]: true })
  return plugin
}

function find (node: ClusterNode, name: string): NodeView {
  const view = node.view.nodeViews().find((n) => n.name === name)
  if (view === undefined) throw new UigniterError('UIG_ERR_NODE_NOT_FOUND', `no node of the cluster is named "${name}"; "uigniter node ls" lists them`)
  return view
}

/** Sends the request to the leader as it came (body and answer streamed), with the cluster's token. */
async function forward (request: FastifyRequest, reply: FastifyReply, apiUrl: string, token: string | undefined): Promise<void> {
  reply.hijack()
  const headers = { ...request.headers }
  delete headers.host
  if (token !== undefined) headers.authorization = `Bearer ${token}`
  else delete headers.authorization
  await new Promise<void>((resolve) => {
    const upstream = httpRequest(new URL(request.url, apiUrl), { method: request.method, headers }, (res) => {
      reply.raw.writeHead(res.statusCode ?? 502, res.headers)
      res.pipe(reply.raw)
      res.on('end', resolve)
      res.on('error', () => { reply.raw.destroy(); resolve() })
    })
    upstream.on('error', (err) => {
      if (!reply.raw.headersSent) {
        const body = JSON.stringify({ code: 'UIG_ERR_NODE_UNREACHABLE', message: `the leader (${apiUrl}) did not answer: ${err.message}`, statusCode: 502 })
        reply.raw.writeHead(502, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
        reply.raw.end(body)
      } else {
        reply.raw.destroy()
      }
      resolve()
    })
    // A client that goes away (an event stream closed) closes the forwarded request too.
    request.raw.on('close', () => { if (!request.raw.complete) upstream.destroy() })
    reply.raw.on('close', () => upstream.destroy())
    request.raw.pipe(upstream)
  })
}
