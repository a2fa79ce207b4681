import { Type } from '@sinclair/typebox'
import type { FastifyInstance } from 'fastify'
import { TemplateSchema, TemplateSpecSchema, type TemplateSpec } from '../core/template.js'
import type { TemplateManager } from '../snapshot/template-manager.js'
import { ErrorBodySchema } from './errors.js'

const NameParams = Type.Object({ name: Type.String({ minLength: 1 }) })
const errors = { 400: ErrorBodySchema, 404: ErrorBodySchema, 409: ErrorBodySchema, 500: ErrorBodySchema }

/** /v1/templates: make (boot and snapshot), list, get, delete. Clones are made with POST /v1/vms {template}. */
export function templateRoutes (templates: TemplateManager) {
  return async function templateRoutesPlugin (app: FastifyInstance): Promise<void> {
    app.post<{ Body: TemplateSpec }>('/v1/templates', {
      schema: {
        tags: ['templates'],
        summary: 'Boot an image to its ready point and snapshot it; answers once the template can be cloned',
        body: TemplateSpecSchema,
        response: { 201: TemplateSchema, ...errors }
      }
    }, async (request, reply) => reply.code(201).send(await templates.create(request.body)))

    app.get('/v1/templates', {
      schema: { tags: ['templates'], summary: 'List templates', response: { 200: Type.Array(TemplateSchema), ...errors } }
    }, async () => await templates.list())

    app.get<{ Params: { name: string } }>('/v1/templates/:name', {
      schema: { tags: ['templates'], summary: 'Get a template', params: NameParams, response: { 200: TemplateSchema, ...errors } }
    }, async (request) => await templates.get(request.params.name))

    app.delete<{ Params: { name: string } }>('/v1/templates/:name', {
      schema: {
        tags: ['templates'],
        summary: 'Delete a template and its RAM file; refused (409) while live clones or a clone pool use it',
        params: NameParams,
        response: { 200: TemplateSchema, ...errors }
      }
    }, async (request) => await templates.remove(request.params.name))
  }
}
