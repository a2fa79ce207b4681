import { Type } from '@sinclair/typebox'
import type { FastifyInstance } from 'fastify'
import { VOLUME_NAME, VolumeCreateRequestSchema, VolumeSchema, type VolumeCreateRequest } from '../core/volume.js'
import type { VolumesApi } from '../volume/volume-manager.js'
import { ErrorBodySchema } from './errors.js'

// The name's pattern is checked here too, so that a bad name in a path is a 400 that says so, not a 404.
const NameParams = Type.Object({ name: Type.String({ pattern: VOLUME_NAME.source, description: 'The volume\'s name' }) })
const errors = { 400: ErrorBodySchema, 404: ErrorBodySchema, 409: ErrorBodySchema, 500: ErrorBodySchema, 507: ErrorBodySchema }

/** /v1/volumes: create, list, get, delete. Volumes are attached with POST /v1/vms {volumes} (docs/volumes.md). */
export function volumeRoutes (volumes: VolumesApi) {
  return async function volumeRoutesPlugin (app: FastifyInstance): Promise<void> {
    app.post<{ Body: VolumeCreateRequest }>('/v1/volumes', {
      schema: {
        tags: ['volumes'],
        summary: 'Create a volume: a sparse file on the host holding a fresh ext4 filesystem of sizeMiB',
        body: VolumeCreateRequestSchema,
        response: { 201: VolumeSchema, ...errors }
      }
    }, async (request, reply) => reply.code(201).send(await volumes.create(request.body)))

    app.get('/v1/volumes', {
      schema: { tags: ['volumes'], summary: 'List volumes with their size on the host, what their filesystem uses, and the live VMs they are attached to', response: { 200: Type.Array(VolumeSchema), ...errors } }
    }, async () => await volumes.list())

    app.get<{ Params: { name: string } }>('/v1/volumes/:name', {
      schema: { tags: ['volumes'], summary: 'Get a volume', params: NameParams, response: { 200: VolumeSchema, ...errors } }
    }, async (request) => await volumes.get(request.params.name))

    app.delete<{ Params: { name: string } }>('/v1/volumes/:name', {
      schema: {
        tags: ['volumes'],
        summary: 'Delete a volume and its data; refused (409) while a live VM has it attached',
        params: NameParams,
        response: { 200: VolumeSchema, ...errors }
      }
    }, async (request) => {
      // Answers with what was deleted, as the other DELETE routes do; remove() checks the attachments again.
      const volume = await volumes.get(request.params.name)
      await volumes.remove(request.params.name)
      return volume
    })
  }
}
