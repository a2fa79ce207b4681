import type { FastifyError, FastifyInstance } from 'fastify'
import { UigniterError, errorCodes } from '../core/errors.js'

/**
 * Every API error is `{ code, message, statusCode }` with a stable code:
 * our own errors as they are, fastify's validation errors as
 * UIG_ERR_API_VALIDATION naming the field, unknown routes as UIG_ERR_API_NOT_FOUND.
 */
export function installErrorHandlers (app: FastifyInstance): void {
  app.setErrorHandler((err: FastifyError | UigniterError | Error, request, reply) => {
    if (err instanceof UigniterError) {
      if (err.statusCode >= 500) request.log.error({ err }, err.message)
      return reply.code(err.statusCode).send(err.toJSON())
    }
    const fastifyErr = err as FastifyError
    if (fastifyErr.validation !== undefined) {
      const where = fastifyErr.validationContext ?? 'request'
      const details = fastifyErr.validation.map((v) => `${where}${v.instancePath || ''} ${v.message ?? ''}`.trim()).join('; ')
      return reply.code(400).send({ code: 'UIG_ERR_API_VALIDATION', message: details, statusCode: 400 })
    }
    if (typeof fastifyErr.statusCode === 'number' && fastifyErr.statusCode < 500) {
      return reply.code(fastifyErr.statusCode).send({ code: 'UIG_ERR_API_VALIDATION', message: err.message, statusCode: fastifyErr.statusCode })
    }
    request.log.error({ err }, 'unexpected error')
    return reply.code(500).send({ code: 'UIG_ERR_INTERNAL', message: err.message, statusCode: 500 })
  })
  app.setNotFoundHandler((request, reply) => {
    return reply.code(404).send({ code: 'UIG_ERR_API_NOT_FOUND', message: `no route ${request.method} ${request.url}; see /openapi.json`, statusCode: 404 })
  })
}

/** The error body schema, for OpenAPI. */
export const ErrorBodySchema = {
  type: 'object',
  properties: {
    code: { type: 'string', enum: Object.keys(errorCodes) },
    message: { type: 'string' },
    statusCode: { type: 'integer' }
  },
  required: ['code', 'message', 'statusCode']
} as const
