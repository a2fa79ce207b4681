import { Type, type Static } from '@sinclair/typebox'
import type { FastifyInstance } from 'fastify'
import type { VmManager } from '../vm/vm-manager.js'
import { ErrorBodySchema } from './errors.js'

const RunBody = Type.Object({
  image_name: Type.String({ minLength: 1 }),
  cmdline: Type.Optional(Type.String({ description: 'The app\'s command line; replaces the image\'s arguments when not empty' })),
  read_only: Type.Optional(Type.Boolean({ description: 'false gives the VM a writable overlay over its root', default: true }))
})

/**
 * The original Uigniter API, kept with its shapes so that existing clients
 * work unchanged: `POST /vm/run` → 201 `{ id, ip_address }`, `POST /vm/{id}/stop`.
 * Unknown body fields are ignored here, as the original did.
 */
export function legacyRoutes (manager: VmManager) {
  return async function legacy (app: FastifyInstance): Promise<void> {
    app.post<{ Body: Static<typeof RunBody> }>('/vm/run', {
      schema: {
        tags: ['legacy'],
        summary: 'Original Uigniter: run a VM from an image',
        body: RunBody,
        response: { 201: Type.Object({ id: Type.String(), ip_address: Type.Union([Type.String(), Type.Null()]) }), 400: ErrorBodySchema, 404: ErrorBodySchema, 500: ErrorBodySchema }
      }
    }, async (request, reply) => {
      const { image_name: image, cmdline, read_only: readOnly } = request.body
      const args = cmdline !== undefined && cmdline.trim() !== '' ? cmdline.trim().split(/\s+/).slice(1) : undefined
      const vm = await manager.create({
        image,
        args,
        env: {},
        network: 'bridge',
        publish: [],
        shares: [],
        ...(readOnly === false ? { overlaySizeMiB: 256 } : {})
      })
      return await reply.code(201).send({ id: vm.id, ip_address: vm.ipAddress })
    })

    app.post<{ Params: { id: string } }>('/vm/:id/stop', {
      schema: {
        tags: ['legacy'],
        summary: 'Original Uigniter: stop a VM (idempotent)',
        params: Type.Object({ id: Type.String() }),
        response: { 200: Type.Object({ id: Type.String(), state: Type.String() }), 404: ErrorBodySchema, 500: ErrorBodySchema }
      }
    }, async (request) => {
      const vm = await manager.stop(request.params.id)
      return { id: vm.id, state: vm.state }
    })
  }
}
