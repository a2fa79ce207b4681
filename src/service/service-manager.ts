import { EventEmitter } from 'node:events'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import type { Endpoint, ServiceSpec, ServiceStatus } from '../core/service.js'
import type { Vm, VmState } from '../core/vm.js'
import type { StoredService } from '../core/ports/state-store.js'
import { ReplicaReaper } from './replica-reaper.js'
import { ServiceController, type ReplicaStarter, type ReplicaVms, type ServiceEvent, type ServiceGateway } from './service-controller.js'
import { changesReplicas, checkGatewayPorts, parseAppFile, parseServiceSpec } from './service-spec.js'

/**
 * Where replicas run, as the services see it: the node's own VMs
 * (VmManager), or, on a cluster's leader, the placements of every node
 * (src/cluster/cluster-replicas.ts). It emits 'vm' ({ vm }) at each change.
 */
export interface ServiceVms extends ReplicaVms {
  list: (filter: { state?: VmState[] }) => Vm[]
  /** Throws UIG_ERR_IMAGE_NOT_FOUND; `init` null is a unikernel. */
  checkImage: (ref: string) => Promise<{ init: unknown }>
  on: (event: 'vm', listener: (event: { vm: Vm }) => void) => unknown
}

/** Where service specs persist: the node's SQLite, or the cluster store (whose writes can fail while it is unreachable). */
export interface ServiceRecords {
  putService: (record: StoredService) => void | Promise<void>
  listServices: () => StoredService[] | Promise<StoredService[]>
  deleteService: (name: string) => void | Promise<void>
}

export interface ServiceManagerDeps {
  vms: ServiceVms
  store: ServiceRecords
  launcher: ReplicaStarter
  gateway: ServiceGateway
  /** The gateway's HTTP port, which no service may take as its gatewayPort. */
  gatewayHttpPort: number
  /** Called with every gateway port in use, so that VMs may reach them through the firewall. */
  allowGatewayPorts: (ports: number[]) => Promise<void>
  log: Logger
  tickMs?: number
}

/** What the API reads and changes of the services: a ServiceManager, or a cluster node's (src/cluster/cluster-services.ts). */
export type ServicesApi = Pick<ServiceManager, 'list' | 'get' | 'apply' | 'applyApp' | 'remove' | 'removeApp' | 'registry'> & {
  // The listener takes the event (ServiceEvent, RegistryEntry); typed loosely, as EventEmitter's own, so that both emitters fit.
  on: (event: 'service' | 'registry', listener: (event: ServiceEvent & RegistryEntry) => void) => unknown
  off: (event: 'service' | 'registry', listener: (event: ServiceEvent & RegistryEntry) => void) => unknown
}

/** The registry's answer for one service: where it runs and how healthy each endpoint is. */
export interface RegistryEntry { service: string, endpoints: Endpoint[] }

/**
 * The daemon's services: it validates and saves specs, runs one controller
 * per service, and is the registry (service → endpoints with their health)
 * that the API reads and watches. Events: 'service' (ServiceEvent) for the
 * controllers' decisions, 'registry' (RegistryEntry) when endpoints change.
 */
export class ServiceManager extends EventEmitter {
  readonly #deps: ServiceManagerDeps
  readonly #controllers = new Map<string, ServiceController>()
  readonly #reaper: ReplicaReaper
  /** Applies and deletions one at a time: they check and change what spans services (names, ports). */
  #queue: Promise<unknown> = Promise.resolve()

  constructor (deps: ServiceManagerDeps) {
    super()
    this.#deps = deps
    this.#reaper = new ReplicaReaper(deps.vms, deps.log.child({ component: 'reaper' }))
    deps.vms.on('vm', (event) => {
      const { vm } = event
      if (vm.service === null || (vm.state !== 'exited' && vm.state !== 'failed')) return
      this.#controllers.get(vm.service.name)?.vmEnded(vm)
    })
  }

  /** After a daemon (re)start: each saved service, with its live replicas adopted back. */
  async restore (): Promise<void> {
    const live = this.#deps.vms.list({ state: ['starting', 'running', 'paused', 'stopping'] })
    for (const stored of await this.#deps.store.listServices()) {
      const adopted = live.filter((vm) => vm.service?.name === stored.spec.name && vm.state === 'running')
      const controller = this.#controller(stored.spec, stored.app, stored.generation, adopted)
      try {
        await controller.start()
      } catch (err) {
        this.#deps.log.error({ err, service: stored.spec.name }, 'the service could not be routed; it stays down until it is applied again')
        this.#controllers.delete(stored.spec.name)
      }
    }
    await this.#allowPorts()
  }

  /** A request for a service with no endpoint waits in the gateway. */
  wake (service: string): void {
    this.#controllers.get(service)?.wake()
  }

  /** Creates or updates one service. `app` null keeps the application it belongs to. */
  async apply (input: unknown, app: string | null = null): Promise<ServiceStatus> {
    const spec = parseServiceSpec(input)
    return await this.#serial(async () => await this.#apply(spec, app ?? this.#controllers.get(spec.name)?.app ?? null))
  }

  /**
   * Brings an application to what its file declares: its services created
   * or updated, and its services the file no longer lists deleted.
   */
  async applyApp (input: unknown): Promise<ServiceStatus[]> {
    const file = parseAppFile(input, this.#deps.gatewayHttpPort)
    return await this.#serial(async () => {
      for (const spec of file.services) {
        const owner = this.#controllers.get(spec.name)?.app
        if (owner !== undefined && owner !== file.app) {
          throw new UigniterError('UIG_ERR_SERVICE_CONFLICT', `service "${spec.name}" belongs to ${owner === null ? 'no application' : `application "${owner}"`}, not "${file.app}"; rename it or delete that service first`)
        }
      }
      const listed = new Set(file.services.map((s) => s.name))
      const statuses: ServiceStatus[] = []
      for (const spec of file.services) statuses.push(await this.#apply(spec, file.app))
      for (const c of [...this.#controllers.values()]) {
        if (c.app === file.app && !listed.has(c.name)) await this.#remove(c.name)
      }
      return statuses
    })
  }

  async remove (name: string): Promise<ServiceStatus> {
    return await this.#serial(async () => await this.#remove(name))
  }

  /** Deletes every service of the application; an unknown application is an empty list. */
  async removeApp (app: string): Promise<string[]> {
    return await this.#serial(async () => {
      const names = [...this.#controllers.values()].filter((c) => c.app === app).map((c) => c.name)
      await Promise.all(names.map(async (name) => await this.#remove(name)))
      return names
    })
  }

  /**
   * Moves the replicas that `evicted` picks elsewhere, as a rollout does: a
   * new replica first, then the evicted one drained. A node drain uses it.
   */
  evict (evicted: (vm: Vm) => boolean): number {
    let n = 0
    for (const c of this.#controllers.values()) n += c.evict(evicted)
    return n
  }

  /** Reconciles every service now: capacity changed (a node joined, freed room or was lost). */
  capacityChanged (): void {
    for (const c of this.#controllers.values()) c.capacityChanged()
  }

  get (name: string): ServiceStatus {
    return this.#get(name).status()
  }

  list (app?: string): ServiceStatus[] {
    return [...this.#controllers.values()].filter((c) => app === undefined || c.app === app)
      .sort((a, b) => a.name.localeCompare(b.name)).map((c) => c.status())
  }

  registry (service?: string): RegistryEntry[] {
    if (service !== undefined) return [{ service, endpoints: this.#get(service).endpoints() }]
    return [...this.#controllers.values()].sort((a, b) => a.name.localeCompare(b.name)).map((c) => ({ service: c.name, endpoints: c.endpoints() }))
  }

  /** Stops the controllers; replicas keep running and are adopted by the next daemon. */
  close (): void {
    for (const c of this.#controllers.values()) c.close()
    this.#controllers.clear()
    this.#reaper.close()
  }

  async #apply (asked: ServiceSpec, app: string | null): Promise<ServiceStatus> {
    let spec = asked
    let note = ''
    if (spec.image !== undefined && (await this.#deps.vms.checkImage(spec.image)).init === null && spec.startPath !== 'cold') {
      // A unikernel has no init to take a clone's identity, so no template: its replicas boot cold
      // (startPath defaults to clone, so refusing would refuse every unikernel service that does not say cold).
      note = `; image ${spec.image} is a unikernel (no uigniter init), so its replicas start cold, not by ${spec.startPath}`
      this.#deps.log.warn({ service: spec.name, image: spec.image }, `startPath ${spec.startPath} falls back to cold for a unikernel image`)
      spec = { ...spec, startPath: 'cold' }
    }
    const others = [...this.#controllers.values()].filter((c) => c.name !== spec.name).map((c) => c.spec)
    checkGatewayPorts([...others, spec], this.#deps.gatewayHttpPort)
    const existing = this.#controllers.get(spec.name)
    if (existing !== undefined) {
      // Saved first: a store that refuses the write (a cluster store out of reach) leaves the service as it was.
      await this.#deps.store.putService({ spec, app, generation: existing.generation + (changesReplicas(existing.spec, spec) ? 1 : 0) })
      const rollout = await existing.update(spec, app)
      this.#emitService(existing, (rollout ? `updated: generation ${existing.generation} rolls out` : 'updated in place') + note)
      await this.#allowPorts()
      return existing.status()
    }
    await this.#deps.store.putService({ spec, app, generation: 1 })
    const controller = this.#controller(spec, app, 1, [])
    await controller.start().catch(async (err: unknown) => {
      this.#controllers.delete(spec.name)
      await this.#deps.store.deleteService(spec.name)
      throw err
    })
    this.#emitService(controller, `created${note}`)
    await this.#allowPorts()
    return controller.status()
  }

  async #remove (name: string): Promise<ServiceStatus> {
    const controller = this.#get(name)
    const status = controller.status()
    await this.#deps.store.deleteService(name)
    this.#controllers.delete(name)
    await controller.delete()
    this.emit('service', { type: 'service.deleted', service: name, generation: controller.generation, message: 'deleted: replicas stopped, routes removed', at: new Date().toISOString() } satisfies ServiceEvent)
    this.emit('registry', { service: name, endpoints: [] } satisfies RegistryEntry)
    await this.#allowPorts()
    return status
  }

  #controller (spec: ServiceSpec, app: string | null, generation: number, adopted: Vm[]): ServiceController {
    const controller = new ServiceController({
      vms: this.#deps.vms,
      reaper: this.#reaper,
      launcher: this.#deps.launcher,
      gateway: this.#deps.gateway,
      log: this.#deps.log,
      onEvent: (event) => this.emit('service', event),
      onEndpoints: (service) => {
        const c = this.#controllers.get(service)
        if (c !== undefined) this.emit('registry', { service, endpoints: c.endpoints() } satisfies RegistryEntry)
      },
      ...(this.#deps.tickMs !== undefined ? { tickMs: this.#deps.tickMs } : {})
    }, { spec, app, generation }, adopted)
    this.#controllers.set(spec.name, controller)
    return controller
  }

  #emitService (c: ServiceController, message: string): void {
    this.emit('service', { type: 'service.applied', service: c.name, generation: c.generation, message, at: new Date().toISOString() } satisfies ServiceEvent)
  }

  async #allowPorts (): Promise<void> {
    const tcp = [...this.#controllers.values()].flatMap((c) => c.spec.ports.flatMap((p) => p.gatewayPort !== undefined ? [p.gatewayPort] : []))
    await this.#deps.allowGatewayPorts([this.#deps.gatewayHttpPort, ...tcp])
  }

  #get (name: string): ServiceController {
    const c = this.#controllers.get(name)
    if (c === undefined) throw new UigniterError('UIG_ERR_SERVICE_NOT_FOUND', `no service is named "${name}"; "uigniter service ls" lists them`)
    return c
  }

  async #serial<T> (work: () => Promise<T>): Promise<T> {
    const next = this.#queue.then(work, work)
    this.#queue = next.catch(() => {})
    return await next
  }
}
