import { Type } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import type { FastifyInstance } from 'fastify'
import { describeSchemaErrors } from '../core/config.js'
import { UigniterError } from '../core/errors.js'
import { ClaimResultSchema, PoolSpecSchema, PoolStatusSchema, type PoolSpec } from '../core/pool.js'
import type { PoolManager } from '../pool/pool-manager.js'
import { ErrorBodySchema } from './errors.js'

const ClaimOptionsSchema = Type.Object({
  onEmpty: Type.Optional(Type.Union([Type.Literal('create'), Type.Literal('queue'), Type.Literal('reject')])),
  queueTimeoutMs: Type.Optional(Type.Integer({ minimum: 0, maximum: 600_000 })),
  env: Type.Optional(Type.Record(Type.String({ pattern: '^[A-Za-z_][A-Za-z0-9_]*$' }), Type.String(), { description: 'booted pools: the app\'s env, given with its identity' }))
}, { additionalProperties: false })
const NameParams = Type.Object({ name: Type.String({ minLength: 1 }) })
const errors = { 400: ErrorBodySchema, 404: ErrorBodySchema, 409: ErrorBodySchema, 500: ErrorBodySchema, 503: ErrorBodySchema }

/** /v1/pools: create, list, get, resize, delete, claim, release. */
export function poolRoutes (pools: PoolManager) {
  return async function poolRoutesPlugin (app: FastifyInstance): Promise<void> {
    app.post<{ Body: PoolSpec }>('/v1/pools', {
      schema: { tags: ['pools'], summary: 'Create a warm pool and start filling it', body: PoolSpecSchema, response: { 201: PoolStatusSchema, ...errors } }
    }, async (request, reply) => reply.code(201).send(await pools.create(request.body)))

    app.get('/v1/pools', {
      schema: { tags: ['pools'], summary: 'List pools with their depth and counters', response: { 200: Type.Array(PoolStatusSchema), ...errors } }
    }, async () => pools.list())

    app.get<{ Params: { name: string } }>('/v1/pools/:name', {
      schema: { tags: ['pools'], summary: 'Get a pool', params: NameParams, response: { 200: PoolStatusSchema, ...errors } }
    }, async (request) => pools.status(request.params.name))

    app.patch<{ Params: { name: string }, Body: { min?: number, max?: number } }>('/v1/pools/:name', {
      schema: {
        tags: ['pools'],
        summary: 'Resize a pool',
        params: NameParams,
        body: Type.Object({ min: Type.Optional(Type.Integer({ minimum: 0, maximum: 1000 })), max: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000 })) }, { additionalProperties: false }),
        response: { 200: PoolStatusSchema, ...errors }
      }
    }, async (request) => await pools.resize(request.params.name, request.body))

    app.delete<{ Params: { name: string } }>('/v1/pools/:name', {
      schema: { tags: ['pools'], summary: 'Delete a pool and its ready VMs (claimed VMs stay)', params: NameParams, response: { 200: PoolStatusSchema, ...errors } }
    }, async (request) => await pools.remove(request.params.name))

    app.post<{ Params: { name: string }, Body: { onEmpty?: 'create' | 'queue' | 'reject', queueTimeoutMs?: number, env?: Record<string, string> } }>('/v1/pools/:name/claim', {
      schema: {
        tags: ['pools'],
        summary: 'Claim a VM: its address, its start path and a timing breakdown',
        params: NameParams,
        // No body schema: a claim usually has no body, which fastify's validator would refuse.
        response: { 200: ClaimResultSchema, ...errors }
      }
    }, async (request) => {
      const body = request.body ?? {}
      if (!Value.Check(ClaimOptionsSchema, body)) {
        throw new UigniterError('UIG_ERR_API_VALIDATION', `invalid claim options: ${describeSchemaErrors(ClaimOptionsSchema, body)}`)
      }
      return await pools.claim(request.params.name, body)
    })

    app.post<{ Params: { name: string }, Body: { vm: string, onRelease?: 'destroy' | 'recycle' } }>('/v1/pools/:name/release', {
      schema: {
        tags: ['pools'],
        summary: 'Give a claimed VM back (destroyed, or recycled: destroyed and replaced by a fresh one)',
        params: NameParams,
        body: Type.Object({ vm: Type.String({ minLength: 1 }), onRelease: Type.Optional(Type.Union([Type.Literal('destroy'), Type.Literal('recycle')])) }, { additionalProperties: false }),
        response: { 204: Type.Null(), ...errors }
      }
    }, async (request, reply) => {
      await pools.release(request.params.name, request.body.vm, request.body.onRelease !== undefined ? { onRelease: request.body.onRelease } : {})
      return await reply.code(204).send()
    })
  }
}
