import { Type, type Static } from '@sinclair/typebox'
import { PlacementRulesSchema } from './cluster.js'
import { ServiceVolumeSchema } from './volume.js'

/**
 * Services: what an application declares (ServiceSpec, in an application
 * file or through the API) and what uigniter reports about it
 * (ServiceStatus, Endpoint). One schema is the source of the types, the API
 * validation, the OpenAPI document and the application file's validation.
 */

/** Service and application names: they become Host names and env var parts. */
export const SERVICE_NAME = /^[a-z][a-z0-9-]{0,30}$/

export const StrategyNameSchema = Type.Union([
  Type.Literal('round-robin'), Type.Literal('weighted'), Type.Literal('priority'),
  Type.Literal('least-connections'), Type.Literal('fastest-response'), Type.Literal('power-of-two'),
  Type.Literal('random'), Type.Literal('consistent-hash')
], { description: 'How the gateway picks the endpoint of each request (HTTP) or connection (TCP)' })
export type StrategyName = Static<typeof StrategyNameSchema>

export const LoadBalancingSchema = Type.Object({
  strategy: StrategyNameSchema,
  hashOn: Type.Optional(Type.String({
    pattern: '^(header:[A-Za-z0-9-]+|cookie:[!#-+.-:<>-~]+|path|client-address)$',
    description: 'consistent-hash only: `header:NAME`, `cookie:NAME`, `path` or `client-address` (TCP connections always hash on the client address)'
  })),
  replicaWeight: Type.Integer({ minimum: 1, maximum: 1000, default: 1, description: 'weighted: the weight of each replica, against the weights of `endpoints`' })
}, { additionalProperties: false, default: { strategy: 'round-robin' } })
export type LoadBalancing = Static<typeof LoadBalancingSchema>

export const ServicePortSchema = Type.Object({
  port: Type.Integer({ minimum: 1, maximum: 65535, description: 'The port the app listens on in the guest' }),
  protocol: Type.Union([Type.Literal('http'), Type.Literal('tcp')], { default: 'http' }),
  gatewayPort: Type.Optional(Type.Integer({ minimum: 1, maximum: 65535, description: 'tcp only, and required there: the gateway\'s port for this service' }))
}, { additionalProperties: false })
export type ServicePort = Static<typeof ServicePortSchema>

export const HealthCheckSchema = Type.Object({
  type: Type.Optional(Type.Union([Type.Literal('http'), Type.Literal('tcp')], { description: 'Default: http when the checked port is an http port, else tcp' })),
  port: Type.Optional(Type.Integer({ minimum: 1, maximum: 65535, description: 'Default: the first port' })),
  path: Type.String({ pattern: '^/', default: '/', description: 'http: a GET of this path must answer 2xx or 3xx' }),
  intervalMs: Type.Integer({ minimum: 100, maximum: 600_000, default: 1000 }),
  timeoutMs: Type.Integer({ minimum: 10, maximum: 60_000, default: 1000 }),
  healthyThreshold: Type.Integer({ minimum: 1, maximum: 100, default: 1, description: 'Consecutive passes before a replica takes traffic' }),
  unhealthyThreshold: Type.Integer({ minimum: 1, maximum: 100, default: 3, description: 'Consecutive failures before a serving replica is taken out and replaced' })
}, { additionalProperties: false })
export type HealthCheck = Static<typeof HealthCheckSchema>

const IPV4 = '^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$'

export const ExternalEndpointSchema = Type.Object({
  host: Type.String({ pattern: IPV4, description: 'An IPv4 address outside uigniter that serves the same ports (a fallback, a legacy server)' }),
  weight: Type.Integer({ minimum: 1, maximum: 1000, default: 1 }),
  priority: Type.Integer({ minimum: 0, maximum: 100, default: 1, description: 'Lower is preferred; replicas have priority 0' })
}, { additionalProperties: false })
export type ExternalEndpoint = Static<typeof ExternalEndpointSchema>

export const AutoscaleSchema = Type.Object({
  targetInFlight: Type.Number({ exclusiveMinimum: 0, maximum: 100_000, default: 10, description: 'In-flight requests (and open TCP connections) per replica the service is scaled to' }),
  scaleUpCooldownMs: Type.Integer({ minimum: 0, maximum: 3_600_000, default: 5000 }),
  scaleDownCooldownMs: Type.Integer({ minimum: 0, maximum: 3_600_000, default: 30_000 }),
  idleToZeroMs: Type.Integer({ minimum: 1000, maximum: 86_400_000, default: 60_000, description: 'With replicas.min 0: scale to zero after this long without a request' })
}, { additionalProperties: false })
export type Autoscale = Static<typeof AutoscaleSchema>

export const ServiceSpecSchema = Type.Object({
  name: Type.String({ pattern: SERVICE_NAME.source, description: 'Also its gateway name: Host `NAME` or the `/svc/NAME/` prefix' }),
  image: Type.Optional(Type.String({ minLength: 1, description: 'name[:tag]; a service without one routes only to its `endpoints`' })),
  replicas: Type.Object({
    min: Type.Integer({ minimum: 0, maximum: 1000, default: 1, description: '0 lets the service scale to zero when idle' }),
    max: Type.Optional(Type.Integer({ minimum: 0, maximum: 1000, description: 'Default: min, or 1 when min is 0; at least 1 with an image. A service without an image has 0' }))
  }, { additionalProperties: false, default: {} }),
  resources: Type.Object({
    vcpus: Type.Optional(Type.Integer({ minimum: 1, maximum: 64 })),
    memoryMiB: Type.Optional(Type.Integer({ minimum: 32, maximum: 1048576 }))
  }, { additionalProperties: false, default: {}, description: 'Default: the image\'s' }),
  ports: Type.Array(ServicePortSchema, { minItems: 1, maxItems: 16 }),
  args: Type.Optional(Type.Array(Type.String(), { description: 'Replace the image\'s app arguments' })),
  env: Type.Record(Type.String({ pattern: '^[A-Za-z_][A-Za-z0-9_]*$' }), Type.String(), { default: {}, additionalProperties: false, description: 'Names are letters, digits and _' }),
  healthCheck: Type.Optional(HealthCheckSchema),
  restart: Type.Union([Type.Literal('always'), Type.Literal('on-failure'), Type.Literal('never')], {
    default: 'always',
    description: 'Which ended replicas are replaced: always; on-failure (not an app that exited with 0); never'
  }),
  startPath: Type.Union([Type.Literal('clone'), Type.Literal('pool'), Type.Literal('cold')], {
    default: 'clone',
    description: 'clone: each replica is cloned from a template the controller makes; pool: claimed from a clone pool that keeps one spare; cold: booted from the image'
  }),
  loadBalancing: LoadBalancingSchema,
  endpoints: Type.Array(ExternalEndpointSchema, { default: [], maxItems: 64 }),
  autoscale: Type.Optional(AutoscaleSchema),
  hold: Type.Object({
    maxRequests: Type.Integer({ minimum: 0, maximum: 100_000, default: 100, description: 'Requests (and TCP connections) held while no endpoint is ready; past it: 503' }),
    timeoutMs: Type.Integer({ minimum: 100, maximum: 600_000, default: 30_000, description: 'How long one is held before a 503' })
  }, { additionalProperties: false, default: {} }),
  drainTimeoutMs: Type.Integer({ minimum: 0, maximum: 600_000, default: 10_000, description: 'How long a replica being stopped keeps its in-flight requests' }),
  placement: PlacementRulesSchema,
  volumes: Type.Array(ServiceVolumeSchema, {
    default: [],
    maxItems: 8,
    description: 'Persistent volumes (docs/volumes.md): per replica, following the replica\'s index as a StatefulSet\'s do, or one existing volume shared read-only. Per-replica volumes need startPath cold'
  })
}, { additionalProperties: false })
export type ServiceSpec = Static<typeof ServiceSpecSchema>

export const AppFileSchema = Type.Object({
  app: Type.String({ pattern: SERVICE_NAME.source, description: 'The application\'s name: `uigniter down` takes down its services' }),
  services: Type.Array(ServiceSpecSchema, { minItems: 1, maxItems: 100 })
}, { additionalProperties: false })
export type AppFile = Static<typeof AppFileSchema>

export const EndpointHealthSchema = Type.Union([
  Type.Literal('starting'), Type.Literal('healthy'), Type.Literal('unhealthy'), Type.Literal('draining')
], { description: 'starting: not passed its health check yet; healthy: takes traffic; unhealthy: failed it, being replaced; draining: finishing its requests before it stops' })
export type EndpointHealth = Static<typeof EndpointHealthSchema>

export const EndpointSchema = Type.Object({
  id: Type.String({ description: 'The VM id, or `external:HOST`' }),
  vm: Type.Union([Type.String(), Type.Null()], { description: 'The VM name' }),
  host: Type.String(),
  generation: Type.Integer({ description: 'The spec generation it runs' }),
  health: EndpointHealthSchema,
  weight: Type.Integer(),
  priority: Type.Integer(),
  since: Type.String({ description: 'When it entered this health state' }),
  node: Type.Optional(Type.String({ description: 'The cluster node it runs on (a cluster only)' }))
}, { additionalProperties: false })
export type Endpoint = Static<typeof EndpointSchema>

export const ServiceStatusSchema = Type.Object({
  spec: ServiceSpecSchema,
  app: Type.Union([Type.String(), Type.Null()]),
  generation: Type.Integer({ description: 'Grows by one at each change of what a replica runs (image, env, args, resources, ports)' }),
  desired: Type.Integer({ description: 'Replicas wanted now: the autoscaler\'s figure within min and max' }),
  ready: Type.Integer({ description: 'Healthy replicas' }),
  endpoints: Type.Array(EndpointSchema),
  template: Type.Union([Type.String(), Type.Null()], { description: 'The template its replicas are cloned from (start paths clone and pool)' }),
  inFlight: Type.Integer({ description: 'Requests and TCP connections the gateway has open to it' }),
  message: Type.Union([Type.String(), Type.Null()], { description: 'Why the service is not at its desired replicas, when it is not' })
}, { additionalProperties: false })
export type ServiceStatus = Static<typeof ServiceStatusSchema>
