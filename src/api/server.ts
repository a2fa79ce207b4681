import swagger from '@fastify/swagger'
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import type { ImageRepository } from '../core/ports/image-repository.js'
import type { VmManager } from '../vm/vm-manager.js'
import type { PoolManager } from '../pool/pool-manager.js'
import type { TemplateManager } from '../snapshot/template-manager.js'
import type { ServicesApi } from '../service/service-manager.js'
import type { VolumesApi } from '../volume/volume-manager.js'
import type { Registry } from 'prom-client'
import { installErrorHandlers } from './errors.js'
import { imageRoutes } from './image-routes.js'
import { legacyRoutes } from './legacy-routes.js'
import { poolRoutes } from './pool-routes.js'
import { addDaemonMetrics, addVolumeMetrics, systemRoutes, type DaemonInfo } from './system-routes.js'
import { serviceRoutes } from './service-routes.js'
import { templateRoutes } from './template-routes.js'
import { vmRoutes, type PlaceVm } from './vm-routes.js'
import { volumeRoutes } from './volume-routes.js'
import { clusterRoutes, singleHostClusterRoutes } from './cluster-routes.js'
import { imageBlobRoutes, type ImageBlobSource } from './image-blob-routes.js'
import type { ClusterNode } from '../cluster/cluster-node.js'

export interface ApiOptions {
  manager: VmManager
  pools: PoolManager
  templates: TemplateManager
  services: ServicesApi
  volumes: VolumesApi
  images: ImageRepository
  /** The daemon's metrics registry; the gateway registers its own metrics in it too. */
  metrics: Registry
  info: DaemonInfo
  log: Logger
  /** When set, TCP requests must carry `Authorization: Bearer <token>`; the unix socket is guarded by its file mode. */
  token?: string
  /** A cluster node: its routes, its images served to peers, and where new VMs go. */
  cluster?: { node: ClusterNode, blobs: ImageBlobSource, placeVm: PlaceVm }
}

/**
 * The REST API: one plugin per resource, TypeBox schemas for validation and
 * for the OpenAPI document at /openapi.json. Unknown body fields are errors,
 * not silently dropped.
 */
export async function buildApi (options: ApiOptions): Promise<FastifyInstance> {
  // Typed as fastify's logger so that route plugins see one logger type.
  const logger: FastifyBaseLogger = options.log.child({ component: 'api' })
  const app = Fastify({
    loggerInstance: logger,
    disableRequestLogging: true,
    // Event streams and log follows never go idle: close them too when the daemon stops.
    forceCloseConnections: true,
    ajv: { customOptions: { removeAdditional: false, useDefaults: true, coerceTypes: 'array', allErrors: false } }
  })
  await app.register(swagger, {
    openapi: {
      info: { title: 'uigniter', version: options.info.version, description: 'Run each service of an application as a single-purpose microVM.' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } }
    }
  })
  installErrorHandlers(app)
  if (options.token !== undefined) {
    const expected = `Bearer ${options.token}`
    app.addHook('onRequest', async (request) => {
      // Requests over the unix socket have no remote address.
      if (request.socket.remoteAddress === undefined) return
      if (request.headers.authorization !== expected) {
        throw new UigniterError('UIG_ERR_API_UNAUTHORIZED', 'this daemon requires "Authorization: Bearer <token>" (the token is api.token in its configuration)')
      }
    })
  }
  addDaemonMetrics(options.metrics, options.manager, options.pools)
  addVolumeMetrics(options.metrics, options.volumes)
  if (options.cluster !== undefined) {
    await app.register(clusterRoutes(options.cluster.node, options.token))
    await app.register(imageBlobRoutes, { images: options.cluster.blobs })
  } else {
    await app.register(singleHostClusterRoutes())
  }
  await app.register(systemRoutes(options, options.metrics))
  await app.register(imageRoutes(options.images))
  await app.register(vmRoutes(options.manager, options.cluster?.placeVm))
  await app.register(poolRoutes(options.pools))
  await app.register(templateRoutes(options.templates))
  await app.register(serviceRoutes(options.services))
  await app.register(volumeRoutes(options.volumes))
  await app.register(legacyRoutes(options.manager))
  return app
}
