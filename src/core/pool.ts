import { Type, type Static } from '@sinclair/typebox'
import { VmSchema } from './vm.js'

/** Pool schemas: what a client declares, and what the daemon reports. */

export const PoolKindSchema = Type.Union([Type.Literal('prespawned'), Type.Literal('booted'), Type.Literal('clone')], {
  default: 'prespawned',
  description: 'prespawned: QEMU started and paused with its tap, IP and MAC, not yet booted (the original Uigniter pool); ' +
    'booted: the guest booted and its init waits for the claim to start the app; clone: clones of a template, app started'
})
export type PoolKind = Static<typeof PoolKindSchema>

export const PoolSpecSchema = Type.Object({
  name: Type.String({ pattern: '^[a-z0-9][a-z0-9_.-]{0,62}$' }),
  kind: PoolKindSchema,
  image: Type.Optional(Type.String({ minLength: 1, description: 'prespawned and booted pools: name[:tag]' })),
  template: Type.Optional(Type.String({ minLength: 1, description: 'clone pools: the template to clone' })),
  vcpus: Type.Optional(Type.Integer({ minimum: 1, maximum: 64 })),
  memoryMiB: Type.Optional(Type.Integer({ minimum: 32, maximum: 1048576 })),
  min: Type.Integer({ minimum: 0, maximum: 1000, default: 1 }),
  max: Type.Integer({ minimum: 1, maximum: 1000, default: 10 }),
  onEmpty: Type.Union([Type.Literal('create'), Type.Literal('queue'), Type.Literal('reject')], { default: 'create' }),
  queueTimeoutMs: Type.Integer({ minimum: 0, maximum: 600_000, default: 30_000 }),
  onRelease: Type.Union([Type.Literal('destroy'), Type.Literal('recycle')], { default: 'recycle' }),
  refillConcurrency: Type.Integer({ minimum: 1, maximum: 64, default: 1 })
}, { additionalProperties: false })
export type PoolSpec = Static<typeof PoolSpecSchema>

export const PoolStatusSchema = Type.Object({
  spec: PoolSpecSchema,
  ready: Type.Integer(),
  creating: Type.Integer(),
  claimed: Type.Integer(),
  hits: Type.Integer(),
  misses: Type.Integer(),
  waits: Type.Integer(),
  failures: Type.Integer({ description: 'Instance makes and removals that failed, in all' }),
  consecutiveFailures: Type.Integer({ description: 'Makes that failed in a row; the refill backs off while it is above 0' }),
  lastError: Type.Union([Type.String(), Type.Null()], { description: 'Why the last make failed' }),
  retryAt: Type.Union([Type.String(), Type.Null()], { description: 'When the refill tries again (ISO 8601), while it backs off' })
}, { additionalProperties: false })
export type PoolStatus = Static<typeof PoolStatusSchema>

export const ClaimResultSchema = Type.Object({
  vm: VmSchema,
  path: Type.Union([Type.Literal('pool'), Type.Literal('clone'), Type.Literal('cold')]),
  timings: Type.Object({
    waitMs: Type.Number({ description: 'Waiting for an instance (0 on a hit)' }),
    resumeMs: Type.Number({ description: 'Handing the instance over: resuming a prespawned one, assigning a booted one its identity' }),
    totalMs: Type.Number()
  }, { additionalProperties: false })
}, { additionalProperties: false })
export type ClaimResult = Static<typeof ClaimResultSchema>
