import { Type } from '@sinclair/typebox'
import type { FastifyInstance } from 'fastify'
import { UigniterError } from '../core/errors.js'
import { VmCreateRequestSchema, VmSchema, VmStateSchema, type Vm, type VmCreateRequest, type VmState } from '../core/vm.js'
import type { VmManager } from '../vm/vm-manager.js'
import { ErrorBodySchema } from './errors.js'

const IdParams = Type.Object({ id: Type.String({ minLength: 1, description: 'VM id or name' }) })
const errors = { 400: ErrorBodySchema, 404: ErrorBodySchema, 409: ErrorBodySchema, 500: ErrorBodySchema }

/**
 * Where a new VM runs, in a cluster: it returns the VM when another node
 * created it, or undefined to create it here. A single host has none, and
 * refuses a request that names a node.
 */
export type PlaceVm = (request: VmCreateRequest) => Promise<Vm | undefined>

/** /v1/vms: create-and-start, list, get, stop, kill, pause, resume, delete, logs. */
export function vmRoutes (manager: VmManager, placeVm?: PlaceVm) {
  return async function vms (app: FastifyInstance): Promise<void> {
    app.post<{ Body: VmCreateRequest }>('/v1/vms', {
      schema: { tags: ['vms'], summary: 'Create a VM and start it: boot an image, or clone a template (startPath says which)', body: VmCreateRequestSchema, response: { 201: VmSchema, ...errors, 502: ErrorBodySchema, 507: ErrorBodySchema } }
    }, async (request, reply) => {
      if (placeVm === undefined && request.body.node !== undefined) {
        throw new UigniterError('UIG_ERR_CLUSTER_NOT_ENABLED', `this daemon runs a single host, so it cannot place a VM on node "${request.body.node}"; drop --node`)
      }
      const elsewhere = placeVm !== undefined ? await placeVm(request.body) : undefined
      return reply.code(201).send(elsewhere ?? await manager.create(request.body))
    })

    app.get<{ Querystring: { state?: string, image?: string, name?: string, all?: boolean } }>('/v1/vms', {
      schema: {
        tags: ['vms'],
        summary: 'List VMs (live ones unless all=true or state is given)',
        querystring: Type.Object({
          state: Type.Optional(Type.String({ description: 'Comma-separated states' })),
          image: Type.Optional(Type.String()),
          name: Type.Optional(Type.String()),
          all: Type.Optional(Type.Boolean({ default: false }))
        }, { additionalProperties: false }),
        response: { 200: Type.Array(VmSchema), ...errors }
      }
    }, async (request) => {
      const { state, image, name, all } = request.query
      const states = state !== undefined
        ? state.split(',').map((s) => s.trim()).filter((s) => s !== '')
        : all === true ? undefined : ['starting', 'running', 'paused', 'stopping']
      const known = VmStateSchema.anyOf.map((s) => s.const as string)
      const bad = states?.find((s) => !known.includes(s))
      if (bad !== undefined) {
        throw new UigniterError('UIG_ERR_API_VALIDATION', `unknown state "${bad}"; use ${known.join(', ')}`)
      }
      return manager.list({ state: states as VmState[] | undefined, image, name })
    })

    app.get<{ Params: { id: string } }>('/v1/vms/:id', {
      schema: { tags: ['vms'], summary: 'Get a VM', params: IdParams, response: { 200: VmSchema, ...errors } }
    }, async (request) => manager.get(request.params.id))

    app.post<{ Params: { id: string }, Querystring: { timeoutMs: number } }>('/v1/vms/:id/stop', {
      schema: {
        tags: ['vms'],
        summary: 'Stop gracefully (SIGTERM to the app, then QMP quit, then SIGKILL); idempotent',
        params: IdParams,
        querystring: Type.Object({ timeoutMs: Type.Integer({ minimum: 0, maximum: 600_000, default: 10_000 }) }, { additionalProperties: false }),
        response: { 200: VmSchema, ...errors }
      }
    }, async (request) => await manager.stop(request.params.id, request.query.timeoutMs))

    app.post<{ Params: { id: string } }>('/v1/vms/:id/kill', {
      schema: { tags: ['vms'], summary: 'Kill at once (SIGKILL); idempotent', params: IdParams, response: { 200: VmSchema, ...errors } }
    }, async (request) => await manager.kill(request.params.id))

    app.post<{ Params: { id: string } }>('/v1/vms/:id/pause', {
      schema: { tags: ['vms'], summary: 'Pause the vCPUs', params: IdParams, response: { 200: VmSchema, ...errors } }
    }, async (request) => await manager.pause(request.params.id))

    app.post<{ Params: { id: string } }>('/v1/vms/:id/resume', {
      schema: { tags: ['vms'], summary: 'Resume a paused VM', params: IdParams, response: { 200: VmSchema, ...errors } }
    }, async (request) => await manager.resume(request.params.id))

    app.delete<{ Params: { id: string }, Querystring: { force: boolean } }>('/v1/vms/:id', {
      schema: {
        tags: ['vms'],
        summary: 'Delete a VM and its state; a live VM needs force=true',
        params: IdParams,
        querystring: Type.Object({ force: Type.Boolean({ default: false }) }, { additionalProperties: false }),
        response: { 200: VmSchema, ...errors }
      }
    }, async (request) => await manager.remove(request.params.id, request.query.force))

    app.get<{ Params: { id: string }, Querystring: { tail: number, follow: boolean } }>('/v1/vms/:id/logs', {
      schema: {
        tags: ['vms'],
        summary: 'The VM\'s console; follow=true streams until the VM ends or the client goes',
        params: IdParams,
        querystring: Type.Object({
          tail: Type.Integer({ minimum: 0, maximum: 16 * 1024 * 1024, default: 65536, description: 'Bytes of the end of the log' }),
          follow: Type.Boolean({ default: false })
        }, { additionalProperties: false }),
        response: { 200: Type.String(), ...errors }
      }
    }, async (request, reply) => {
      const vm = manager.get(request.params.id)
      const text = await manager.logs(vm.id, request.query.tail)
      if (!request.query.follow) return await reply.type('text/plain; charset=utf-8').send(text)
      reply.hijack()
      const raw = reply.raw
      raw.writeHead(200, { 'content-type': 'text/plain; charset=utf-8', 'cache-control': 'no-cache' })
      raw.write(text)
      const stop = manager.followLogs(vm.id, (chunk) => raw.write(chunk))
      const onVm = (event: { vm: { id: string, state: string } }): void => {
        if (event.vm.id === vm.id && (event.vm.state === 'exited' || event.vm.state === 'failed')) end()
      }
      const end = (): void => {
        stop()
        manager.off('vm', onVm)
        raw.end()
      }
      manager.on('vm', onVm)
      request.raw.on('close', end)
    })
  }
}
