import { createHash } from 'node:crypto'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import type { ServiceSpec } from '../core/service.js'
import type { Vm } from '../core/vm.js'
import type { VmManager } from '../vm/vm-manager.js'
import type { PoolManager } from '../pool/pool-manager.js'
import type { TemplateManager } from '../snapshot/template-manager.js'
import type { VolumeManager } from '../volume/volume-manager.js'

export interface ReplicaLauncherDeps {
  vms: VmManager
  pools: PoolManager
  templates: TemplateManager
  volumes: Pick<VolumeManager, 'replicaMounts'>
  /** Env every replica gets on top of its spec's: where the gateway is. */
  gatewayEnv: Record<string, string>
  log: Logger
}

export const poolName = (service: string): string => `svc-${service}`
const OWNED = /^svc-([a-z][a-z0-9-]{0,30})-g(\d+)-[0-9a-f]{8}$/

/**
 * Starts replicas by a service's start path:
 * - `cold`: boots the image;
 * - `clone`: clones a template of the service's generation, which it makes
 *   first (`ready: app`, so a clone serves as soon as it took its identity);
 * - `pool`: claims from a clone pool of that template that keeps a spare.
 * The template bakes the spec's env and the gateway's address in, so a new
 * generation gets a new template.
 */
export class ReplicaLauncher {
  readonly #deps: ReplicaLauncherDeps
  /** Templates (and pools) being made, by template name and start path: several replicas wait for one making. */
  readonly #making = new Map<string, Promise<void>>()
  /** The ones known made, so that a replica start does not look at the template's files again (a wake from zero waits on it). */
  readonly #made = new Set<string>()

  constructor (deps: ReplicaLauncherDeps) {
    this.#deps = deps
  }

  /**
   * Makes what the start path needs (template, pool), so that the first
   * replica is quick. Idempotent; concurrent calls share one making.
   */
  async prepare (spec: ServiceSpec, generation: number): Promise<string | null> {
    if (spec.image === undefined || spec.startPath === 'cold') return null
    const name = this.#templateName(spec, generation)
    const key = `${name}/${spec.startPath}`
    if (this.#made.has(key)) return name
    let making = this.#making.get(key)
    if (making === undefined) {
      making = (async () => {
        await this.#template(spec, name)
        if (spec.startPath === 'pool') await this.#pool(spec, name)
      })()
      this.#making.set(key, making)
      making.then(() => { this.#making.delete(key); this.#made.add(key) }, () => this.#making.delete(key))
    }
    await making
    return name
  }

  /** Starts one replica; resolves once its VM runs (its health check decides when it serves). */
  async start (spec: ServiceSpec, generation: number, replicaName: string, index?: number): Promise<Vm> {
    const image = spec.image
    if (image === undefined) throw new UigniterError('UIG_ERR_SERVICE_SPEC_INVALID', `service ${spec.name} has no image to start replicas from`)
    const service = { name: spec.name, generation, ...(index !== undefined ? { index } : {}) }
    const specVolumes = spec.volumes ?? []
    if (specVolumes.some((v) => v.perReplica) && index === undefined) {
      throw new UigniterError('UIG_ERR_SERVICE_SPEC_INVALID', `service ${spec.name} has per-replica volumes, so each replica start needs its index`)
    }
    if (spec.startPath === 'cold') {
      // Made here, on the node the replica runs on: a volume lives where it was made.
      const volumes = await this.#deps.volumes.replicaMounts(spec.name, specVolumes, index ?? 0)
      return await this.#deps.vms.create({
        name: replicaName,
        image,
        env: this.#env(spec),
        network: 'bridge',
        publish: [],
        shares: [],
        volumes,
        ...(spec.args !== undefined ? { args: spec.args } : {}),
        ...(spec.resources.vcpus !== undefined ? { vcpus: spec.resources.vcpus } : {}),
        ...(spec.resources.memoryMiB !== undefined ? { memoryMiB: spec.resources.memoryMiB } : {})
      }, { service })
    }
    const template = await this.prepare(spec, generation) ?? ''
    try {
      if (spec.startPath === 'pool') {
        const claim = await this.#deps.pools.claim(poolName(spec.name), { onEmpty: 'create' })
        return this.#deps.vms.setService(claim.vm.id, service)
      }
      return await this.#deps.vms.create({ name: replicaName, template, env: {}, network: 'bridge', publish: [], shares: [] }, { service })
    } catch (err) {
      // Deleted behind the service's back: the next start makes it again.
      if (err instanceof UigniterError && (err.code === 'UIG_ERR_TEMPLATE_NOT_FOUND' || err.code === 'UIG_ERR_POOL_NOT_FOUND')) this.#made.delete(`${template}/${spec.startPath}`)
      throw err
    }
  }

  /**
   * Removes the service's templates (and pool) of generations other than
   * `keep`, once no replica runs them; with `keep` null, all of them.
   * Templates still in use stay, for a later call.
   */
  async cleanup (service: string, keep: number | null, pool: boolean): Promise<void> {
    if (!pool || keep === null) {
      if (this.#deps.pools.list().some((p) => p.spec.name === poolName(service))) {
        await this.#deps.pools.remove(poolName(service)).catch((err: unknown) => { this.#deps.log.warn({ err, service }, 'removing the service\'s pool failed') })
        for (const key of [...this.#made]) if (key.startsWith(`svc-${service}-g`) && key.endsWith('/pool')) this.#made.delete(key)
      }
    }
    for (const info of await this.#deps.templates.list()) {
      const m = OWNED.exec(info.name)
      if (m === null || m[1] !== service || Number(m[2]) === keep || [...this.#making.keys()].some((k) => k.startsWith(`${info.name}/`))) continue
      if (this.#deps.templates.liveClones(info.name).length > 0) continue
      if (this.#deps.pools.list().some((p) => p.spec.template === info.name)) continue
      await this.#deps.templates.remove(info.name).then(() => {
        for (const key of [...this.#made]) if (key.startsWith(`${info.name}/`)) this.#made.delete(key)
      }, (err: unknown) => { this.#deps.log.debug({ err, template: info.name }, 'template not removed yet') })
    }
  }

  /**
   * A service's template is named after it, its generation and a hash of
   * what the template bakes in (image, args, env with the gateway's address,
   * resources, ports), so that a template left from an earlier service of
   * the same name, or from before the gateway moved, is never cloned.
   */
  #templateName (spec: ServiceSpec, generation: number): string {
    const env = Object.entries(this.#env(spec)).sort(([a], [b]) => a.localeCompare(b))
    const baked = JSON.stringify([spec.image, spec.args ?? null, env, spec.resources.vcpus ?? null, spec.resources.memoryMiB ?? null, spec.ports])
    return `svc-${spec.name}-g${generation}-${createHash('sha256').update(baked).digest('hex').slice(0, 8)}`
  }

  #env (spec: ServiceSpec): Record<string, string> {
    return { ...this.#deps.gatewayEnv, ...spec.env }
  }

  async #template (spec: ServiceSpec, name: string): Promise<void> {
    if (await this.#deps.templates.get(name).then(() => true, () => false)) return
    const probePort = spec.healthCheck?.port ?? spec.ports[0]?.port
    await this.#deps.templates.create({
      name,
      image: spec.image,
      ready: 'app',
      ...(probePort !== undefined ? { port: probePort } : {}),
      ...(spec.healthCheck?.type !== 'tcp' && spec.healthCheck !== undefined ? { httpPath: spec.healthCheck.path } : {}),
      env: this.#env(spec),
      ...(spec.args !== undefined ? { args: spec.args } : {}),
      ...(spec.resources.vcpus !== undefined ? { vcpus: spec.resources.vcpus } : {}),
      ...(spec.resources.memoryMiB !== undefined ? { memoryMiB: spec.resources.memoryMiB } : {})
    })
  }

  async #pool (spec: ServiceSpec, template: string): Promise<void> {
    const existing = this.#deps.pools.list().find((p) => p.spec.name === poolName(spec.name))
    if (existing?.spec.template === template) return
    if (existing !== undefined) await this.#deps.pools.remove(existing.spec.name)
    // One spare: a claim takes it and the pool clones the next in the background.
    await this.#deps.pools.create({ name: poolName(spec.name), kind: 'clone', template, min: 1, max: 1, onEmpty: 'create', onRelease: 'destroy' })
  }
}
