import { Type, type Static } from '@sinclair/typebox'
import { AfterCloneSchema } from './image.js'

/** Template schemas: what a client asks for, and what the daemon reports. */

export const TemplateReadySchema = Type.Union([Type.Literal('init'), Type.Literal('app')], {
  description: 'init: snapshot where the guest init waits to start the app (each clone gets its own env); ' +
    'app: snapshot once the app answers on its port (clones skip the app\'s start-up too, and share its env)'
})
export type TemplateReady = Static<typeof TemplateReadySchema>

export const TemplateSpecSchema = Type.Object({
  name: Type.String({ pattern: '^[a-z0-9][a-z0-9_.-]{0,62}$' }),
  image: Type.String({ minLength: 1, description: 'name[:tag]' }),
  ready: Type.Optional(TemplateReadySchema),
  port: Type.Optional(Type.Integer({ minimum: 1, maximum: 65535, description: 'ready: app — the guest port that must answer; default: the image\'s first port' })),
  httpPath: Type.Optional(Type.String({ pattern: '^/', description: 'ready: app — answer a GET of this path with 2xx/3xx instead of accepting a TCP connection' })),
  vcpus: Type.Optional(Type.Integer({ minimum: 1, maximum: 64 })),
  memoryMiB: Type.Optional(Type.Integer({ minimum: 32, maximum: 1048576 })),
  args: Type.Optional(Type.Array(Type.String(), { description: 'Replace the image\'s app arguments (every clone runs them)' })),
  env: Type.Record(Type.String({ pattern: '^[A-Za-z_][A-Za-z0-9_]*$' }), Type.String(), { additionalProperties: false, default: {}, description: 'Every clone\'s app gets these' }),
  timeoutMs: Type.Integer({ minimum: 1000, maximum: 600_000, default: 120_000, description: 'Boot to the ready point' }),
  afterClone: Type.Optional(Type.Union([AfterCloneSchema, Type.Null()], { description: 'ready: app — replaces the image\'s after-clone hook; null for none' }))
}, { additionalProperties: false })
export type TemplateSpec = Static<typeof TemplateSpecSchema>

export const TemplateSchema = Type.Object({
  name: Type.String(),
  image: Type.String({ description: 'name:tag it was made from' }),
  imageDigest: Type.String(),
  ready: TemplateReadySchema,
  port: Type.Union([Type.Integer(), Type.Null()]),
  httpPath: Type.Union([Type.String(), Type.Null()]),
  vcpus: Type.Integer(),
  memoryMiB: Type.Integer(),
  network: Type.Union([Type.Literal('bridge'), Type.Literal('user')], { description: 'Its clones\' network: a clone\'s NIC backend must match the template\'s' }),
  createdAt: Type.String(),
  timings: Type.Object({
    bootMs: Type.Number({ description: 'QEMU start to the ready point' }),
    saveMs: Type.Number({ description: 'Pause and device-state save' })
  }, { additionalProperties: false }),
  memoryPath: Type.String({ description: 'The guest RAM file every clone maps copy-on-write' }),
  stateBytes: Type.Integer({ description: 'Size of the saved device state' }),
  clones: Type.Integer({ description: 'Live clones (VMs started from it)' }),
  afterClone: Type.Union([AfterCloneSchema, Type.Null()], { description: 'What each clone\'s app is told once it took its identity (ready: app)' }),
  cloneSafe: Type.Boolean({ description: 'Clones share no app state that must differ: ready: init, a clone-safe image, or a hook' }),
  warnings: Type.Array(Type.String(), { description: 'What a user should know, e.g. that clones share the app\'s random state' })
}, { additionalProperties: false })
export type TemplateInfo = Static<typeof TemplateSchema>
