import { Type, type Static } from '@sinclair/typebox'
import { VolumeMountSchema } from './volume.js'

/**
 * VM schemas: what a client asks for (VmCreateRequest) and what uigniter
 * records and reports (Vm). The state of the QEMU process is kept apart from
 * the lifecycle state of the resource: `state` is the resource, `exit` says
 * how the process ended.
 */

export const VmStateSchema = Type.Union([
  Type.Literal('starting'), Type.Literal('running'), Type.Literal('paused'),
  Type.Literal('stopping'), Type.Literal('exited'), Type.Literal('failed')
])
export type VmState = Static<typeof VmStateSchema>

export const PublishSchema = Type.Object({
  hostPort: Type.Integer({ minimum: 1, maximum: 65535 }),
  guestPort: Type.Integer({ minimum: 1, maximum: 65535 }),
  hostAddress: Type.String({ default: '127.0.0.1', description: 'Host address to listen on' })
}, { additionalProperties: false })
export type Publish = Static<typeof PublishSchema>

export const ShareSchema = Type.Object({
  hostPath: Type.String({ pattern: '^/' }),
  guestPath: Type.String({ pattern: '^/' }),
  readOnly: Type.Boolean({ default: true })
}, { additionalProperties: false })
export type Share = Static<typeof ShareSchema>

export const VmCreateRequestSchema = Type.Object({
  name: Type.Optional(Type.String({ pattern: '^[a-z0-9][a-z0-9_.-]{0,62}$', description: 'Unique; generated when absent' })),
  image: Type.Optional(Type.String({ minLength: 1, description: 'name[:tag]; give this or template' })),
  template: Type.Optional(Type.String({ minLength: 1, description: 'Clone this template instead of booting an image (start path `clone`)' })),
  node: Type.Optional(Type.String({ pattern: '^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$', description: 'A cluster only: the node to run it on; without it the scheduler chooses' })),
  args: Type.Optional(Type.Array(Type.String(), { description: 'Replace the image\'s app arguments' })),
  env: Type.Record(Type.String({ pattern: '^[A-Za-z_][A-Za-z0-9_]*$' }), Type.String(), { additionalProperties: false, default: {} }),
  vcpus: Type.Optional(Type.Integer({ minimum: 1, maximum: 64 })),
  memoryMiB: Type.Optional(Type.Integer({ minimum: 32, maximum: 1048576 })),
  cpuAffinity: Type.Optional(Type.Array(Type.Integer({ minimum: 0 }), { minItems: 1, description: 'Host CPUs for the VM\'s threads' })),
  network: Type.Union([Type.Literal('bridge'), Type.Literal('user'), Type.Literal('none')], { default: 'bridge' }),
  publish: Type.Array(PublishSchema, { default: [] }),
  overlaySizeMiB: Type.Optional(Type.Integer({ minimum: 16, maximum: 1048576, description: 'A writable overlay over the read-only root, deleted with the VM' })),
  shares: Type.Array(ShareSchema, { default: [] }),
  volumes: Type.Optional(Type.Array(VolumeMountSchema, { maxItems: 16, description: 'Persistent volumes to attach (docs/volumes.md); a read-write one may be attached to one live VM only' }))
}, { additionalProperties: false })
export type VmCreateRequest = Static<typeof VmCreateRequestSchema>

export const VmExitSchema = Type.Object({
  reason: Type.Union([
    Type.Literal('app-exited'), Type.Literal('exec-failed'), Type.Literal('stopped'), Type.Literal('killed'),
    Type.Literal('crashed'), Type.Literal('out-of-memory'), Type.Literal('died-while-daemon-down'), Type.Literal('boot-failed'), Type.Literal('node-lost')
  ]),
  appExitCode: Type.Optional(Type.Integer()),
  appSignal: Type.Optional(Type.Integer()),
  detail: Type.String(),
  at: Type.String()
}, { additionalProperties: false })
export type VmExit = Static<typeof VmExitSchema>

export const StartPathSchema = Type.Union([Type.Literal('cold'), Type.Literal('pool'), Type.Literal('clone')], {
  description: 'cold: booted from its image; pool: handed out ready by a warm pool; clone: restored from a template'
})
export type StartPath = Static<typeof StartPathSchema>

export const StartStepSchema = Type.Object({
  name: Type.String({ description: 'The step (core/start-steps.ts): resolve-image, check-resources, attach-network, spawn, boot, restore, identity, after-clone, warm-up, publish-ports, record, adopt; a pool claim adds claim-wait, resume, identity, hand-out' }),
  ms: Type.Number({ description: 'How long the step took, in milliseconds, as the host saw it' }),
  guestMs: Type.Optional(Type.Number({ description: 'identity: the part of the step the guest init spent, by its own clock' }))
}, { additionalProperties: false })
export type StartStep = Static<typeof StartStepSchema>

export const StartTimingsSchema = Type.Object({
  plan: Type.Union([Type.Literal('cold'), Type.Literal('prespawned'), Type.Literal('booted'), Type.Literal('clone'), Type.Literal('adopted')], {
    description: 'The start path whose steps ran: a cold boot, a pool instance (prespawned or booted), a clone, or a VM adopted after a daemon restart'
  }),
  steps: Type.Array(StartStepSchema, { description: 'Every step that ran, in order, with its duration' }),
  totalMs: Type.Number({ description: 'From the start of the create to the VM recorded as running' }),
  claimMs: Type.Optional(Type.Number({ description: 'Pool instances: the claim, from the request to the hand-out (its steps are the last ones listed)' }))
}, { additionalProperties: false, description: 'How the VM started, step by step' })
export type StartTimings = Static<typeof StartTimingsSchema>

export const ServiceTagSchema = Type.Object({
  name: Type.String(),
  generation: Type.Integer({ description: 'The service spec generation the replica runs' }),
  index: Type.Optional(Type.Integer({ minimum: 0, description: 'Services with per-replica volumes: the replica\'s index, which its volumes follow' }))
}, { additionalProperties: false })
export type ServiceTag = Static<typeof ServiceTagSchema>

export const VmSchema = Type.Object({
  id: Type.String(),
  node: Type.Optional(Type.String({ description: 'The cluster node it runs on (a cluster only)' })),
  name: Type.String(),
  image: Type.String({ description: 'name:tag it was created from' }),
  imageDigest: Type.String(),
  state: VmStateSchema,
  vcpus: Type.Integer(),
  memoryMiB: Type.Integer(),
  network: Type.Union([Type.Literal('bridge'), Type.Literal('user'), Type.Literal('none')]),
  ipAddress: Type.Union([Type.String(), Type.Null()]),
  macAddress: Type.Union([Type.String(), Type.Null()]),
  tap: Type.Union([Type.String(), Type.Null()]),
  publish: Type.Array(PublishSchema),
  pid: Type.Union([Type.Integer(), Type.Null()]),
  accel: Type.String(),
  stateDir: Type.String(),
  createdAt: Type.String(),
  startedAt: Type.Union([Type.String(), Type.Null()]),
  exit: Type.Union([VmExitSchema, Type.Null()]),
  pool: Type.Union([
    Type.Object({ name: Type.String(), claimed: Type.Boolean() }, { additionalProperties: false }),
    Type.Null()
  ], { description: 'The warm pool the VM belongs to, and whether it has been claimed' }),
  startPath: StartPathSchema,
  template: Type.Union([Type.String(), Type.Null()], { description: 'The template it was cloned from' }),
  startTimings: Type.Union([StartTimingsSchema, Type.Null()]),
  service: Type.Union([ServiceTagSchema, Type.Null()], { description: 'The service this VM is a replica of' }),
  volumes: Type.Optional(Type.Array(VolumeMountSchema, { description: 'The volumes attached to it' }))
}, { additionalProperties: false })
export type Vm = Static<typeof VmSchema>
