import { Type } from '@sinclair/typebox'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { UigniterError } from '../core/errors.js'
import { AppFileSchema, EndpointSchema, ServiceSpecSchema, ServiceStatusSchema } from '../core/service.js'
import type { RegistryEntry, ServicesApi } from '../service/service-manager.js'
import { ErrorBodySchema } from './errors.js'

const NameParams = Type.Object({ name: Type.String({ minLength: 1 }) })
const AppParams = Type.Object({ app: Type.String({ minLength: 1 }) })
const errors = { 400: ErrorBodySchema, 404: ErrorBodySchema, 409: ErrorBodySchema, 500: ErrorBodySchema }
const RegistryEntrySchema = Type.Object({ service: Type.String(), endpoints: Type.Array(EndpointSchema) })

/** The body (a JSON object) with its `field` set to the path's name; a body that names another is refused. */
function namedAsPath (body: unknown, field: 'name' | 'app', name: string, what: string): Record<string, unknown> {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new UigniterError('UIG_ERR_SERVICE_SPEC_INVALID', `the body must be a JSON object: the ${what}`)
  const named = body as Record<string, unknown>
  if (named[field] !== undefined && named[field] !== name) {
    throw new UigniterError('UIG_ERR_SERVICE_SPEC_INVALID', `the body names ${what} ${JSON.stringify(named[field])} but the path names "${name}"`)
  }
  return { ...named, [field]: name }
}

/**
 * /v1/services, /v1/apps and /v1/registry. Specs are validated by the
 * service manager, not by the route schema (`attachValidation`), so that an
 * API body and an application file get the same errors
 * (UIG_ERR_SERVICE_SPEC_INVALID naming the field); the schemas here document
 * the bodies.
 */
export function serviceRoutes (services: ServicesApi) {
  /**
   * The bodies as sent, before the schema's defaults filled them in: the
   * service manager's defaults depend on what a spec names (a service with
   * volumes and no startPath boots cold; one naming clone is refused).
   */
  const sent = new WeakMap<FastifyRequest, unknown>()
  const keepSent = async (request: FastifyRequest): Promise<void> => { sent.set(request, structuredClone(request.body)) }
  return async function serviceRoutesPlugin (app: FastifyInstance): Promise<void> {
    app.get<{ Querystring: { app?: string } }>('/v1/services', {
      schema: {
        tags: ['services'],
        summary: 'List services with their replicas, endpoints and health',
        querystring: Type.Object({ app: Type.Optional(Type.String({ description: 'Only this application\'s' })) }, { additionalProperties: false }),
        response: { 200: Type.Array(ServiceStatusSchema), ...errors }
      }
    }, async (request) => services.list(request.query.app))

    app.get<{ Params: { name: string } }>('/v1/services/:name', {
      schema: { tags: ['services'], summary: 'Get a service', params: NameParams, response: { 200: ServiceStatusSchema, ...errors } }
    }, async (request) => services.get(request.params.name))

    app.put<{ Params: { name: string }, Body: unknown }>('/v1/services/:name', {
      attachValidation: true,
      preValidation: keepSent,
      schema: {
        tags: ['services'],
        summary: 'Create or update a service. A change of image, args, env, resources or ports rolls out one replica at a time; other changes apply in place',
        params: NameParams,
        body: ServiceSpecSchema,
        response: { 200: ServiceStatusSchema, ...errors }
      }
    }, async (request) => {
      return await services.apply(namedAsPath(sent.get(request) ?? request.body, 'name', request.params.name, 'service'))
    })

    app.delete<{ Params: { name: string } }>('/v1/services/:name', {
      schema: {
        tags: ['services'],
        summary: 'Delete a service: routes removed, replicas stopped, its templates and pool deleted',
        params: NameParams,
        response: { 200: ServiceStatusSchema, ...errors }
      }
    }, async (request) => await services.remove(request.params.name))

    app.put<{ Params: { app: string }, Body: unknown }>('/v1/apps/:app', {
      attachValidation: true,
      preValidation: keepSent,
      schema: {
        tags: ['services'],
        summary: 'Apply an application file (what `uigniter up` sends): its services created or updated, and its services no longer listed deleted',
        params: AppParams,
        body: AppFileSchema,
        response: { 200: Type.Array(ServiceStatusSchema), ...errors }
      }
    }, async (request) => {
      return await services.applyApp(namedAsPath(sent.get(request) ?? request.body, 'app', request.params.app, 'application'))
    })

    app.delete<{ Params: { app: string } }>('/v1/apps/:app', {
      schema: {
        tags: ['services'],
        summary: 'Delete every service of the application (what `uigniter down` does)',
        params: AppParams,
        response: { 200: Type.Object({ app: Type.String(), deleted: Type.Array(Type.String()) }), ...errors }
      }
    }, async (request) => ({ app: request.params.app, deleted: await services.removeApp(request.params.app) }))

    app.get<{ Querystring: { service?: string } }>('/v1/registry', {
      schema: {
        tags: ['services'],
        summary: 'The registry: each service\'s endpoints (replicas and external endpoints) with their health',
        querystring: Type.Object({ service: Type.Optional(Type.String()) }, { additionalProperties: false }),
        response: { 200: Type.Array(RegistryEntrySchema), ...errors }
      }
    }, async (request) => services.registry(request.query.service))

    app.get<{ Querystring: { service?: string } }>('/v1/registry/watch', {
      schema: {
        tags: ['services'],
        summary: 'Server-sent events: `registry` with a service\'s endpoints, first one per service, then at each change',
        querystring: Type.Object({ service: Type.Optional(Type.String()) }, { additionalProperties: false })
      }
    }, async (request, reply) => {
      const only = request.query.service
      const initial = services.registry(only)
      reply.hijack()
      const raw = reply.raw
      raw.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' })
      const send = (entry: RegistryEntry): void => {
        if (only !== undefined && entry.service !== only) return
        raw.write(`event: registry\ndata: ${JSON.stringify(entry)}\n\n`)
      }
      for (const entry of initial) send(entry)
      const keepAlive = setInterval(() => raw.write(': keep-alive\n\n'), 15_000)
      services.on('registry', send)
      request.raw.on('close', () => {
        clearInterval(keepAlive)
        services.off('registry', send)
      })
    })
  }
}
