import { Type } from '@sinclair/typebox'
import type { FastifyInstance } from 'fastify'
import { ImageManifestSchema } from '../core/image.js'
import type { ImageRepository } from '../core/ports/image-repository.js'
import { ErrorBodySchema } from './errors.js'

const RefParams = Type.Object({ ref: Type.String({ minLength: 1, description: 'name[:tag], URL-encoded (a / in a name is %2F)' }) })
const errors = { 400: ErrorBodySchema, 404: ErrorBodySchema, 500: ErrorBodySchema }

/** /v1/images: list, inspect, delete. Images are built with the CLI (`uigniter image build`). */
export function imageRoutes (images: ImageRepository) {
  return async function imageRoutesPlugin (app: FastifyInstance): Promise<void> {
    app.get('/v1/images', {
      schema: { tags: ['images'], summary: 'List images', response: { 200: Type.Array(ImageManifestSchema), ...errors } }
    }, async () => await images.list())

    app.get<{ Params: { ref: string } }>('/v1/images/:ref', {
      schema: { tags: ['images'], summary: 'Inspect an image', params: RefParams, response: { 200: ImageManifestSchema, ...errors } }
    }, async (request) => await images.get(request.params.ref))

    app.delete<{ Params: { ref: string } }>('/v1/images/:ref', {
      schema: { tags: ['images'], summary: 'Delete an image; blobs no other image uses go too', params: RefParams, response: { 200: ImageManifestSchema, ...errors } }
    }, async (request) => await images.remove(request.params.ref))
  }
}
