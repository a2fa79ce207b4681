import { Type, type Static, type TSchema } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import { LabelsSchema, type NodeStatus } from '../core/cluster.js'
import { describeSchemaErrors } from '../core/config.js'
import { LoadBalancingSchema, ServiceSpecSchema } from '../core/service.js'
import { VmSchema } from '../core/vm.js'

/**
 * The records the nodes write to the cluster store, as schemas: a record
 * is read back by other nodes, so each is checked when read, and one that
 * does not match is dropped (src/cluster/informer.ts) rather than trusted.
 */

const ResourcesSchema = Type.Object({ vcpus: Type.Number({ minimum: 0 }), memoryMiB: Type.Number({ minimum: 0 }) })

export const NodeStatusSchema = Type.Object({
  name: Type.String(),
  apiUrl: Type.String(),
  underlay: Type.String(),
  subnet: Type.String(),
  labels: LabelsSchema,
  accel: Type.Union([Type.Literal('kvm'), Type.Literal('tcg')]),
  capacity: ResourcesSchema,
  allocated: ResourcesSchema,
  vms: Type.Integer({ minimum: 0 }),
  images: Type.Array(Type.Object({ ref: Type.String(), digest: Type.String(), vcpus: Type.Number(), memoryMiB: Type.Number(), init: Type.Boolean() })),
  templates: Type.Array(Type.String()),
  version: Type.String(),
  startedAt: Type.String()
})

/** A replica given to a node by the leader whose term is `epoch`. */
export const PlacementSchema = Type.Object({
  replica: Type.String(),
  node: Type.String(),
  service: Type.String(),
  generation: Type.Integer({ minimum: 1 }),
  epoch: Type.Integer({ minimum: 1 }),
  spec: ServiceSpecSchema,
  imageDigest: Type.String(),
  /** What it takes of the node: the spec's resources, or its image's. */
  resources: ResourcesSchema,
  /** Services with per-replica volumes: the replica's index, which its volumes follow. */
  index: Type.Optional(Type.Integer({ minimum: 0 })),
  at: Type.String()
})
export type Placement = Static<typeof PlacementSchema>

/** A node's report of a replica it runs: the VM record as the node has it. */
export const ReplicaReportSchema = Type.Object({
  replica: Type.String(),
  node: Type.String(),
  epoch: Type.Integer({ minimum: 1 }),
  vm: Type.Optional(VmSchema),
  /** The start failed here, and why (no vm then). */
  error: Type.Optional(Type.String())
})
export type ReplicaReport = Static<typeof ReplicaReportSchema>

export const RouteEndpointSchema = Type.Object({
  id: Type.String(),
  host: Type.String(),
  weight: Type.Integer(),
  priority: Type.Integer(),
  node: Type.Union([Type.String(), Type.Null()])
})
export type RouteEndpoint = Static<typeof RouteEndpointSchema>

/** What every node's gateway needs for one service: its route and its routable endpoints, anywhere in the cluster. */
export const RouteRecordSchema = Type.Object({
  route: Type.Object({
    service: Type.String(),
    loadBalancing: LoadBalancingSchema,
    httpPort: Type.Optional(Type.Integer()),
    tcp: Type.Array(Type.Object({ gatewayPort: Type.Integer(), port: Type.Integer() })),
    hold: Type.Object({ maxRequests: Type.Integer(), timeoutMs: Type.Integer() })
  }),
  endpoints: Type.Array(RouteEndpointSchema),
  /**
   * Endpoints the leader saw die lately (their VM ended, failed its health
   * checks, or went with a lost node), newest last. Every gateway cuts what
   * it still has open to them, retrying where safe: a request in flight to a
   * VM that is gone would otherwise wait for an answer that never comes.
   */
  ended: Type.Optional(Type.Array(Type.String(), { maxItems: 64 })),
  epoch: Type.Integer()
})
export type RouteRecord = Static<typeof RouteRecordSchema>

export const LeaderRecordSchema = Type.Object({ node: Type.String(), apiUrl: Type.String(), since: Type.String() })
export type LeaderRecord = Static<typeof LeaderRecordSchema>

export const StoredServiceSchema = Type.Object({ spec: ServiceSpecSchema, app: Type.Union([Type.String(), Type.Null()]), generation: Type.Integer({ minimum: 1 }) })

/** Parses a record; throws naming what does not match. */
export function parseRecord<S extends TSchema> (schema: S, raw: string): Static<S> {
  const value: unknown = JSON.parse(raw)
  if (!Value.Check(schema, value)) throw new Error(describeSchemaErrors(schema, value))
  return value
}

export const parseNodeStatus = (raw: string): NodeStatus => parseRecord(NodeStatusSchema, raw)

/** Where a volume lives: written by the node that made it, deleted with the volume. */
export const VolumeHomeSchema = Type.Object({
  name: Type.String(),
  node: Type.String(),
  sizeMiB: Type.Integer({ minimum: 1 })
})
export type VolumeHome = Static<typeof VolumeHomeSchema>
