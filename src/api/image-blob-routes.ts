import { open } from 'node:fs/promises'
import { Type } from '@sinclair/typebox'
import type { FastifyPluginAsync } from 'fastify'
import { UigniterError, hasErrno } from '../core/errors.js'
import type { ImageStore } from '../guest/image-store.js'
import { ErrorBodySchema } from './errors.js'

// Strict, so that no param can name a path outside the store (no "..", no "/", no upper case twins).
const DigestParams = Type.Object({
  digest: Type.String({ pattern: '^sha256:[0-9a-f]{64}$', description: 'sha256: and 64 lowercase hex digits' })
}, { additionalProperties: false })
const errors = { 400: ErrorBodySchema, 404: ErrorBodySchema, 500: ErrorBodySchema }

/**
 * What peer nodes fetch images with (issue 12): a manifest by digest, as its
 * stored bytes, and blobs by digest, streamed. Receivers verify both digests,
 * so these routes hand out bytes as they are and check nothing further.
 */
/** Only what the routes read: the daemon passes its ImageStore. */
export type ImageBlobSource = Pick<ImageStore, 'manifestBytes' | 'blobPath'>

export const imageBlobRoutes: FastifyPluginAsync<{ images: ImageBlobSource }> = async (app, { images }) => {
  app.get<{ Params: { digest: string } }>('/v1/cluster/images/:digest', {
    schema: {
      tags: ['cluster'],
      summary: 'An image manifest by digest, as stored (for a peer node to verify and import)',
      params: DigestParams,
      response: { 200: { description: 'The manifest\'s stored JSON bytes', type: 'string' }, ...errors }
    }
  }, async (request, reply) => {
    const bytes = await images.manifestBytes(request.params.digest)
    if (bytes === undefined) {
      throw new UigniterError('UIG_ERR_IMAGE_NOT_FOUND', `this node holds no image ${request.params.digest}; fetch it from another node`)
    }
    // A Buffer bypasses response serialization: the bytes go out unchanged.
    return await reply.type('application/json').header('content-length', bytes.length).send(bytes)
  })

  app.get<{ Params: { digest: string } }>('/v1/cluster/blobs/:digest', {
    schema: {
      tags: ['cluster'],
      summary: 'An image blob by digest, streamed',
      params: DigestParams,
      response: { 200: { description: 'The blob\'s bytes', type: 'string' }, ...errors }
    }
  }, async (request, reply) => {
    let handle
    try {
      handle = await open(images.blobPath(request.params.digest), 'r')
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) {
        throw new UigniterError('UIG_ERR_IMAGE_NOT_FOUND', `this node holds no blob ${request.params.digest}; fetch it from another node`)
      }
      throw err
    }
    try {
      // The length comes from the open file, so it matches the bytes the stream sends.
      const { size } = await handle.stat()
      const stream = handle.createReadStream({ autoClose: true })
      return await reply.type('application/octet-stream').header('content-length', size).send(stream)
    } catch (err) {
      await handle.close()
      throw err
    }
  })
}
