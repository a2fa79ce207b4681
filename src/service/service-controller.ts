import { randomBytes } from 'node:crypto'
import { UigniterError } from '../core/errors.js'
import { probeOnce } from '../core/app-probe.js'
import type { Logger } from '../core/logger.js'
import type { Endpoint, EndpointHealth, ServiceSpec, ServiceStatus } from '../core/service.js'
import type { Vm } from '../core/vm.js'
import type { StoredService } from '../core/ports/state-store.js'
import { autoscaleSettings, scaleDecision } from './autoscaler.js'
import type { ReplicaReaper } from './replica-reaper.js'
import { changesReplicas } from './service-spec.js'

/** What the controller needs of the gateway (src/gateway/gateway.ts implements it). */
export interface ServiceGateway {
  configure: (route: {
    service: string
    loadBalancing: ServiceSpec['loadBalancing']
    httpPort?: number
    tcp: Array<{ gatewayPort: number, port: number }>
    hold: ServiceSpec['hold']
  }) => Promise<void>
  setEndpoints: (service: string, endpoints: Array<{ id: string, host: string, weight: number, priority: number }>) => void
  endpointDied: (service: string, endpointId: string) => void
  remove: (service: string) => Promise<void>
  load: (service: string) => { inFlight: number, held: number, lastRequestAt: number }
  inFlight: (service: string, endpointId: string) => number
  /** True once nothing is in flight to the endpoint, false when `timeoutMs` passes first. */
  whenIdle: (service: string, endpointId: string, timeoutMs: number) => Promise<boolean>
}

/** What starts replicas (ReplicaLauncher on one host; the cluster's placer on a leader). */
export interface ReplicaStarter {
  /** Makes ahead what the start path needs (a template); returns its name, or null. */
  prepare: (spec: ServiceSpec, generation: number) => Promise<string | null>
  /** Starts one replica (with its index when the service has per-replica volumes); resolves once its VM runs. */
  start: (spec: ServiceSpec, generation: number, replicaName: string, index?: number) => Promise<Vm>
  /** Removes what old generations needed, once nothing uses it. */
  cleanup: (service: string, keep: number | null, pool: boolean) => Promise<void>
}

/** What the VM side must do for the controller (VmManager does it). */
export interface ReplicaVms {
  get: (idOrName: string) => Vm
  stop: (idOrName: string, graceMs?: number) => Promise<Vm>
  remove: (idOrName: string, force?: boolean) => Promise<Vm>
}

export interface ServiceEvent {
  type: 'service.applied' | 'service.deleted' | 'service.scaled' | 'service.rollout' |
    'service.replica-starting' | 'service.replica-started' | 'service.replica-start-failed' | 'service.replica-ready' |
    'service.replica-unhealthy' | 'service.replica-exited' | 'service.replica-draining' | 'service.replica-stopped' |
    'service.replica-remove-failed' | 'service.replica-pending'
  service: string
  generation: number
  vm?: string
  message: string
  at: string
}

export interface ServiceControllerDeps {
  vms: ReplicaVms
  /** Removes the VMs of replicas that are done, retrying until they are gone. */
  reaper: ReplicaReaper
  launcher: ReplicaStarter
  gateway: ServiceGateway
  log: Logger
  onEvent: (event: ServiceEvent) => void
  onEndpoints: (service: string) => void
  /** How often the controller looks again without being asked; default 500 ms. */
  tickMs?: number
}

interface Replica {
  vm: Vm
  generation: number
  health: EndpointHealth
  since: number
  passes: number
  fails: number
  checking: boolean
  nextCheckAt: number
  /** To be moved elsewhere (its node drains): replaced as an old generation's replica is. */
  evicted: boolean
}

/** Starting replicas are checked this often, so that they take traffic as soon as they answer. */
const STARTING_CHECK_MS = 100
/** A replica that has not passed its health check by then is replaced. */
const START_DEADLINE_MS = 120_000
const MAX_PARALLEL_STARTS = 3
/** A replica no node can take is tried again this often, besides at each change of capacity. */
const PENDING_RETRY_MS = 3000

/**
 * Keeps one service at what its spec declares: it starts replicas by the
 * start path, checks their health and routes the gateway to the healthy
 * ones, replaces replicas that end or fail their checks, scales with the
 * load (to zero and back), rolls a new generation out one replica at a
 * time with a surge of one, and drains a replica before stopping it. Every
 * decision is an event.
 */
export class ServiceController {
  spec: ServiceSpec
  app: string | null
  generation: number
  desired: number
  readonly #deps: ServiceControllerDeps
  readonly #replicas = new Map<string, Replica>()
  readonly #starts = new Set<Promise<void>>()
  /**
   * Services with per-replica volumes: the indices taken by a replica being
   * started or whose VM is still being removed. An index is free again
   * only once its VM is gone, since its read-write volumes attach to one VM.
   */
  readonly #indicesBusy = new Map<number, number>()
  /** Replicas that ended and, by the restart policy, are not replaced. */
  #retired = 0
  #template: string | null = null
  #message: string | null = null
  #startFailures = 0
  #backoffUntil = 0
  #lastScaleUpAt = 0
  #lastScaleDownAt = 0
  #samples: Array<[number, number]> = []
  #timer: NodeJS.Timeout | undefined
  #busy = false
  #again = false
  #closed = false
  #rollingOut = false
  /** Old generations' templates (and a pool of another kind) wait to be deleted once no replica runs them. */
  #cleanupDue = true

  constructor (deps: ServiceControllerDeps, stored: StoredService, adopted: Vm[]) {
    this.#deps = deps
    this.spec = stored.spec
    this.app = stored.app
    this.generation = stored.generation
    this.desired = Math.max(stored.spec.replicas.min, adopted.length > 0 ? Math.min(adopted.length, stored.spec.replicas.max ?? 1) : 0)
    for (const vm of adopted) this.#replicas.set(vm.id, this.#newReplica(vm, vm.service?.generation ?? stored.generation))
  }

  get name (): string { return this.spec.name }

  /** Routes the gateway and starts reconciling. */
  async start (): Promise<void> {
    await this.#deps.gateway.configure(this.#route())
    this.#publish()
    this.#prepare()
    this.#timer = setInterval(() => this.kick(), this.#deps.tickMs ?? 500)
    this.kick()
  }

  /** Makes the template (and pool) of the current generation ahead of need, so that a wake from zero only clones. */
  #prepare (): void {
    const { spec, generation } = this
    if (spec.image === undefined || spec.startPath === 'cold') return
    this.#deps.launcher.prepare(spec, generation).then((name) => {
      if (generation === this.generation) this.#template = name
    }, (err: unknown) => {
      this.#message = `making the template failed: ${(err as Error).message}`
      this.#deps.log.warn({ err, service: this.name }, 'making the service\'s template failed; the next replica start tries again')
    })
  }

  /** Takes a new spec; a change of what replicas run starts a rolling update. */
  async update (spec: ServiceSpec, app: string | null): Promise<boolean> {
    const rollout = changesReplicas(this.spec, spec)
    await this.#deps.gateway.configure(this.#route(spec))
    if (rollout) this.generation++
    this.spec = spec
    this.app = app
    this.#retired = 0
    this.#backoffUntil = 0
    this.#cleanupDue = true
    this.desired = Math.min(Math.max(this.desired, spec.replicas.min), spec.replicas.max ?? 1)
    if (rollout) {
      this.#rollingOut = this.#replicas.size > 0
      this.#template = null
      this.#event('service.rollout', `rolling out generation ${this.generation}`)
    }
    this.#publish()
    this.#prepare()
    this.kick()
    return rollout
  }

  /** Marks the replicas `evicted` picks to be replaced elsewhere; returns how many. */
  evict (evicted: (vm: Vm) => boolean): number {
    let n = 0
    for (const r of this.#replicas.values()) {
      if (r.evicted || r.health === 'draining' || !evicted(r.vm)) continue
      r.evicted = true
      n++
      this.#event('service.replica-draining', `replica ${r.vm.name} will move off node ${r.vm.node ?? '?'}: a replacement starts first`, r.vm.name)
    }
    if (n > 0) this.kick()
    return n
  }

  /** A request waits in the gateway for a service with no endpoint. */
  wake (): void {
    this.kick()
  }

  /** Capacity changed (a node joined, freed room, or was lost): a pending replica is tried again now. */
  capacityChanged (): void {
    if (this.#message?.startsWith('replica pending') === true) this.#backoffUntil = 0
    this.kick()
  }

  /** Reconciles now, or again right after the reconcile under way. */
  kick (): void {
    if (this.#closed) return
    // A reconcile can end in a kick (a replica failing its start deadline): run again after it, not inside it.
    if (this.#busy) { this.#again = true; return }
    this.#busy = true
    try {
      do {
        this.#again = false
        this.#reconcile()
      } while (this.#again && !this.#closed)
    } catch (err) {
      this.#deps.log.error({ err, service: this.name }, 'reconciling the service failed')
    } finally {
      this.#busy = false
    }
  }

  /** A replica's VM ended (crashed, killed, stopped by someone): replace it as the restart policy says. */
  vmEnded (vm: Vm): void {
    const replica = this.#replicas.get(vm.id)
    if (replica === undefined || replica.health === 'draining') return
    this.#replicas.delete(vm.id)
    this.#deps.gateway.endpointDied(this.name, vm.id)
    this.#publish()
    const policy = this.spec.restart
    const succeeded = vm.exit?.reason === 'app-exited' && vm.exit.appExitCode === 0
    const replace = policy === 'always' || (policy === 'on-failure' && !succeeded)
    if (!replace) this.#retired++
    this.#event('service.replica-exited', `replica ${vm.name} ended (${vm.exit?.reason ?? vm.state}: ${vm.exit?.detail ?? ''}); ${replace ? 'replacing it' : `restart policy ${policy}: not replaced`}`, vm.name)
    void this.#reapHoldingIndex(vm)
    this.kick()
  }

  status (): ServiceStatus {
    const load = this.#deps.gateway.load(this.name)
    const ready = [...this.#replicas.values()].filter((r) => r.health === 'healthy').length
    return {
      spec: this.spec,
      app: this.app,
      generation: this.generation,
      desired: this.desired,
      ready,
      endpoints: this.endpoints(),
      template: this.#template,
      inFlight: load.inFlight,
      message: ready >= this.desired ? null : this.#message
    }
  }

  endpoints (): Endpoint[] {
    const replicas = [...this.#replicas.values()].map((r): Endpoint => ({
      id: r.vm.id,
      vm: r.vm.name,
      host: r.vm.ipAddress ?? '',
      generation: r.generation,
      health: r.health,
      weight: this.spec.loadBalancing.replicaWeight,
      priority: 0,
      since: new Date(r.since).toISOString(),
      ...(r.vm.node !== undefined ? { node: r.vm.node } : {})
    }))
    const external = this.spec.endpoints.map((e): Endpoint => ({
      id: `external:${e.host}`, vm: null, host: e.host, generation: this.generation, health: 'healthy', weight: e.weight, priority: e.priority, since: new Date(0).toISOString()
    }))
    return [...replicas, ...external]
  }

  /** Stops reconciling; replicas keep running for the next daemon. */
  close (): void {
    this.#closed = true
    clearInterval(this.#timer)
  }

  /** Takes the service down: no more routing, replicas drained and removed, its templates and pool deleted. */
  async delete (): Promise<void> {
    this.close()
    await this.#deps.gateway.remove(this.name)
    await Promise.allSettled([...this.#starts])
    await Promise.all([...this.#replicas.values()].map(async (r) => { await this.#reap(r.vm, 2000) }))
    this.#replicas.clear()
    await this.#deps.launcher.cleanup(this.name, null, false)
  }

  #reconcile (): void {
    const now = Date.now()
    this.#scale(now)
    for (const replica of this.#replicas.values()) {
      if (replica.health === 'draining') continue
      if (replica.health === 'starting' && now - replica.since > START_DEADLINE_MS) {
        this.#fail(replica, `did not pass its health check within ${START_DEADLINE_MS / 1000} s`)
        continue
      }
      if (!replica.checking && replica.nextCheckAt <= now) this.#check(replica)
    }
    const want = Math.max(0, this.desired - this.#retired)
    const live = [...this.#replicas.values()].filter((r) => r.health === 'starting' || r.health === 'healthy')
    const current = live.filter((r) => r.generation === this.generation && !r.evicted)
    const old = live.filter((r) => r.generation !== this.generation || r.evicted)
    if (this.#indexed()) {
      this.#reconcileIndexed(now, want, current, old)
      return
    }
    const newLive = current.length + this.#starts.size
    // A rolling update surges by one: a new replica first, then an old one drained.
    let toStart = old.length > 0 ? Math.min(want - newLive, want + 1 - newLive - old.length) : want - newLive
    toStart = Math.min(toStart, MAX_PARALLEL_STARTS - this.#starts.size)
    if (toStart > 0 && now >= this.#backoffUntil && this.spec.image !== undefined) {
      for (let i = 0; i < toStart; i++) this.#startReplica()
    }
    const healthyNew = current.filter((r) => r.health === 'healthy').length
    const byRemovalOrder = (a: Replica, b: Replica): number =>
      (a.health === 'starting' ? 0 : 1) - (b.health === 'starting' ? 0 : 1) || b.since - a.since
    if (old.length > 0) {
      const excess = healthyNew + old.length - want
      for (const r of old.sort(byRemovalOrder).slice(0, Math.max(0, excess))) this.#drain(r, r.evicted ? 'moved off its node' : `generation ${r.generation} replaced by ${this.generation}`)
    } else {
      const excess = current.length - want
      for (const r of current.sort(byRemovalOrder).slice(0, Math.max(0, excess))) this.#drain(r, `scaled down to ${want}`)
      if (this.#rollingOut && this.#starts.size === 0 && current.every((r) => r.health === 'healthy')) {
        this.#rollingOut = false
        this.#event('service.rollout', `generation ${this.generation} rolled out to ${current.length} replica(s)`)
      }
    }
    if (this.#cleanupDue && old.length === 0 && this.#replicas.size === current.length) {
      this.#cleanupDue = false
      void this.#deps.launcher.cleanup(this.name, this.generation, this.spec.startPath === 'pool').catch((err: unknown) => {
        this.#deps.log.warn({ err, service: this.name }, 'cleaning up old templates failed')
      })
    }
  }

  /** Whether replicas have indices: the service has per-replica volumes, which follow the index. */
  #indexed (): boolean {
    return (this.spec.volumes ?? []).some((v) => v.perReplica)
  }

  /**
   * The reconcile of a service whose replicas own volumes, as a
   * StatefulSet's do: replica i is started only once no VM of index i is
   * left, since its read-write volumes attach to one VM. So a rolling
   * update cannot surge: it drains one old replica, then starts its index
   * anew, once every current replica is healthy. Scaling down drains the
   * highest indices; their volumes stay, for a later scale up.
   */
  #reconcileIndexed (now: number, want: number, current: Replica[], old: Replica[]): void {
    const taken = new Set<number>(this.#indicesBusy.keys())
    for (const r of this.#replicas.values()) {
      const index = r.vm.service?.index
      if (index !== undefined) taken.add(index)
    }
    const draining = [...this.#replicas.values()].some((r) => r.health === 'draining')
    // Replicas of an older generation (or without an index: the spec gained volumes) go one at a time.
    const unindexed = current.filter((r) => r.vm.service?.index === undefined)
    const outdated = [...old, ...unindexed]
    if (outdated.length > 0 && !draining && this.#starts.size === 0 && current.every((r) => r.health === 'healthy' || r.vm.service?.index === undefined)) {
      const next = outdated.sort((a, b) => (b.vm.service?.index ?? -1) - (a.vm.service?.index ?? -1))[0]
      if (next !== undefined) this.#drain(next, next.evicted ? 'moved off its node' : `generation ${next.generation} replaced by ${this.generation}`)
    }
    for (const r of current) {
      const index = r.vm.service?.index
      if (index !== undefined && index >= want && r.health !== 'draining') this.#drain(r, `scaled down to ${want}`)
    }
    let budget = MAX_PARALLEL_STARTS - this.#starts.size
    if (now >= this.#backoffUntil && this.spec.image !== undefined) {
      for (let index = 0; index < want && budget > 0; index++) {
        if (taken.has(index)) continue
        this.#startReplica(index)
        budget--
      }
    }
    if (outdated.length === 0 && this.#rollingOut && this.#starts.size === 0 && current.every((r) => r.health === 'healthy')) {
      this.#rollingOut = false
      this.#event('service.rollout', `generation ${this.generation} rolled out to ${current.length} replica(s)`)
    }
    if (this.#cleanupDue && old.length === 0 && this.#replicas.size === current.length) this.#cleanupDue = false
  }

  /** Reaps a replica's VM; its index stays taken until the VM is gone. */
  async #reapHoldingIndex (vm: Vm, graceMs?: number): Promise<void> {
    const index = vm.service?.index
    this.#holdIndex(index)
    try {
      await this.#reap(vm, graceMs)
    } finally {
      if (index !== undefined) {
        this.#releaseIndex(index)
        this.kick()
      }
    }
  }

  #holdIndex (index: number | undefined): void {
    if (index !== undefined) this.#indicesBusy.set(index, (this.#indicesBusy.get(index) ?? 0) + 1)
  }

  #releaseIndex (index: number | undefined): void {
    if (index === undefined) return
    const n = (this.#indicesBusy.get(index) ?? 1) - 1
    if (n > 0) this.#indicesBusy.set(index, n)
    else this.#indicesBusy.delete(index)
  }

  #scale (now: number): void {
    const load = this.#deps.gateway.load(this.name)
    const window = autoscaleSettings(this.spec)?.scaleDownCooldownMs ?? 0
    this.#samples.push([now, load.inFlight])
    while (this.#samples.length > 0 && (this.#samples[0]?.[0] ?? now) < now - window) this.#samples.shift()
    const decision = scaleDecision({
      spec: this.spec,
      desired: this.desired,
      inFlight: load.inFlight,
      recentPeakInFlight: Math.max(0, ...this.#samples.map(([, n]) => n)),
      lastRequestAt: load.lastRequestAt,
      held: load.held,
      lastScaleUpAt: this.#lastScaleUpAt,
      lastScaleDownAt: this.#lastScaleDownAt,
      now
    })
    if (decision.desired === this.desired) return
    if (decision.desired > this.desired) this.#lastScaleUpAt = now
    else this.#lastScaleDownAt = now
    this.#event('service.scaled', `${this.desired} → ${decision.desired} replica(s)${decision.reason !== null ? `: ${decision.reason}` : ''}`)
    this.desired = decision.desired
  }

  #startReplica (index?: number): void {
    const generation = this.generation
    const spec = this.spec
    // The index leads a replica's name, as in a StatefulSet; the suffix keeps it apart from its predecessor's record.
    const name = `${spec.name}-${index !== undefined ? `${index}-` : ''}${randomBytes(3).toString('hex')}`
    this.#holdIndex(index)
    this.#event('service.replica-starting', `starting replica ${name} (${spec.startPath}${index !== undefined ? `, index ${index}` : ''})`, name)
    const start = (async () => {
      try {
        const vm = await this.#deps.launcher.start(spec, generation, name, index)
        if (this.#closed || generation !== this.generation) {
          // Deleted, or a newer spec arrived meanwhile: this replica runs the old one.
          if (generation !== this.generation && !this.#closed) {
            this.#replicas.set(vm.id, this.#newReplica(vm, generation))
          } else {
            await this.#reap(vm)
          }
          return
        }
        const current = this.#deps.vms.get(vm.id)
        if (current.state !== 'running') throw new Error(`its VM is ${current.state}`)
        this.#replicas.set(vm.id, this.#newReplica(current, generation))
        // Set here too when making it ahead (#prepare) failed and the start made it.
        this.#template ??= current.template
        this.#deps.onEndpoints(this.name)
        this.#startFailures = 0
        this.#event('service.replica-started', `replica ${vm.name} runs (${vm.startPath}, ${Math.round(vm.startTimings?.totalMs ?? 0)} ms); checking its health`, vm.name)
      } catch (err) {
        if (err instanceof UigniterError && err.code === 'UIG_ERR_CLUSTER_UNSCHEDULABLE') {
          // Pending, not failed: it is tried again at each change of capacity (capacityChanged) and every few seconds.
          this.#backoffUntil = Date.now() + PENDING_RETRY_MS
          this.#message = `replica pending: ${err.message}`
          this.#event('service.replica-pending', this.#message, name)
          return
        }
        this.#startFailures++
        const backoff = Math.min(30_000, 500 * 2 ** this.#startFailures)
        this.#backoffUntil = Date.now() + backoff
        this.#message = `starting a replica failed: ${(err as Error).message}`
        this.#event('service.replica-start-failed', `${this.#message}; next try in ${backoff / 1000} s`, name)
      }
    })()
    this.#starts.add(start)
    void start.finally(() => {
      this.#starts.delete(start)
      this.#releaseIndex(index)
      this.kick()
    })
  }

  #check (replica: Replica): void {
    const check = this.spec.healthCheck
    const port = check?.port ?? this.spec.ports[0]?.port ?? 0
    const isHttp = check?.type !== undefined ? check.type === 'http' : this.spec.ports.find((p) => p.port === port)?.protocol === 'http'
    replica.checking = true
    const probe = {
      host: replica.vm.ipAddress ?? '',
      port,
      // Without a declared check, any HTTP answer shows the app is up.
      ...(isHttp ? { httpPath: check?.path ?? '/', anyStatus: check === undefined } : {})
    }
    void probeOnce(probe, check?.timeoutMs ?? 1000).then((ok) => {
      replica.checking = false
      if (!this.#replicas.has(replica.vm.id) || replica.health === 'draining' || this.#closed) return
      replica.nextCheckAt = Date.now() + (replica.health === 'starting' ? STARTING_CHECK_MS : check?.intervalMs ?? 1000)
      if (ok) {
        replica.passes++
        replica.fails = 0
        if (replica.health === 'starting' && replica.passes >= (check?.healthyThreshold ?? 1)) {
          this.#setHealth(replica, 'healthy')
          this.#event('service.replica-ready', `replica ${replica.vm.name} passed its health check; it takes traffic`, replica.vm.name)
          this.kick()
        }
      } else {
        replica.fails++
        replica.passes = 0
        if (replica.health === 'healthy' && replica.fails >= (check?.unhealthyThreshold ?? 3)) {
          this.#fail(replica, `failed ${replica.fails} health checks in a row`)
        }
      }
    })
  }

  /** An unhealthy replica: out of the gateway now, replaced, and stopped. */
  #fail (replica: Replica, why: string): void {
    this.#setHealth(replica, 'unhealthy')
    this.#event('service.replica-unhealthy', `replica ${replica.vm.name} ${why}; replacing it`, replica.vm.name)
    this.#replicas.delete(replica.vm.id)
    this.#deps.gateway.endpointDied(this.name, replica.vm.id)
    this.#publish()
    void this.#reapHoldingIndex(replica.vm)
    this.kick()
  }

  /** Stops routing new requests to the replica, waits for its in-flight ones, then stops it. */
  #drain (replica: Replica, why: string): void {
    this.#setHealth(replica, 'draining')
    this.#event('service.replica-draining', `draining replica ${replica.vm.name}: ${why}`, replica.vm.name)
    void (async () => {
      const idle = await this.#deps.gateway.whenIdle(this.name, replica.vm.id, this.spec.drainTimeoutMs)
      const left = idle ? 0 : this.#deps.gateway.inFlight(this.name, replica.vm.id)
      await this.#reap(replica.vm, 2000)
      // Whatever it still held is cut now, not left waiting on a VM that is gone.
      this.#deps.gateway.endpointDied(this.name, replica.vm.id)
      this.#replicas.delete(replica.vm.id)
      this.#publish()
      this.#event('service.replica-stopped', `replica ${replica.vm.name} stopped${left > 0 ? ` with ${left} request(s) still in flight after ${this.spec.drainTimeoutMs} ms` : ' after its in-flight requests finished'}`, replica.vm.name)
      this.kick()
    })()
  }

  /** Stops (for `graceMs`, when given) and removes a replica's VM; a failure is an event, and retried. */
  async #reap (vm: Vm, graceMs?: number): Promise<void> {
    await this.#deps.reaper.reap(vm, {
      ...(graceMs !== undefined ? { graceMs } : {}),
      onFailure: (err, attempt, retryInMs) => {
        this.#event('service.replica-remove-failed', `removing replica ${vm.name} failed (attempt ${attempt}: ${err.message}); trying again in ${Math.round(retryInMs / 1000)} s`, vm.name)
      }
    })
  }

  #setHealth (replica: Replica, health: EndpointHealth): void {
    replica.health = health
    replica.since = Date.now()
    this.#publish()
  }

  /** Tells the gateway the routable endpoints: healthy replicas and the external endpoints. */
  #publish (): void {
    const routable = [...this.#replicas.values()]
      .filter((r) => r.health === 'healthy' && r.vm.ipAddress !== null)
      .map((r) => ({ id: r.vm.id, host: r.vm.ipAddress ?? '', weight: this.spec.loadBalancing.replicaWeight, priority: 0 }))
    const external = this.spec.endpoints.map((e) => ({ id: `external:${e.host}`, host: e.host, weight: e.weight, priority: e.priority }))
    if (!this.#closed) this.#deps.gateway.setEndpoints(this.name, [...routable, ...external])
    this.#deps.onEndpoints(this.name)
  }

  #route (spec: ServiceSpec = this.spec): Parameters<ServiceGateway['configure']>[0] {
    const http = spec.ports.find((p) => p.protocol === 'http')
    return {
      service: spec.name,
      loadBalancing: spec.loadBalancing,
      ...(http !== undefined ? { httpPort: http.port } : {}),
      tcp: spec.ports.filter((p) => p.protocol === 'tcp').map((p) => ({ gatewayPort: p.gatewayPort ?? 0, port: p.port })),
      hold: spec.hold
    }
  }

  #newReplica (vm: Vm, generation: number): Replica {
    return { vm, generation, health: 'starting', since: Date.now(), passes: 0, fails: 0, checking: false, nextCheckAt: 0, evicted: false }
  }

  #event (type: ServiceEvent['type'], message: string, vm?: string): void {
    this.#deps.log.info({ service: this.name, event: type, vm }, message)
    this.#deps.onEvent({ type, service: this.name, generation: this.generation, ...(vm !== undefined ? { vm } : {}), message, at: new Date().toISOString() })
  }
}
