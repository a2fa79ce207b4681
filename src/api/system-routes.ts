import { Type } from '@sinclair/typebox'
import type { FastifyInstance } from 'fastify'
import { Counter, Gauge, collectDefaultMetrics, type Registry } from 'prom-client'
import type { VmEvent, VmManager } from '../vm/vm-manager.js'
import type { TemplateEvent, TemplateManager } from '../snapshot/template-manager.js'
import type { PoolEvent, PoolManager } from '../pool/pool-manager.js'
import type { ServiceEvent } from '../service/service-controller.js'
import type { ServicesApi } from '../service/service-manager.js'
import type { Volume, VolumeEvent } from '../core/volume.js'
import type { VolumesApi } from '../volume/volume-manager.js'

export interface DaemonInfo {
  version: string
  accel: { accel: string, reason: string }
  network: { mode: string, bridge?: string, subnet?: string, reason?: string }
  /** Where the REST API listens: a unix socket and a TCP address. */
  api: { socket: string, listen: string }
  /** The service gateway: where it listens, and the address guests reach it on. */
  gateway: { address: string, httpPort: number, guestAddress: string }
  dataDir: string
  startedAt: string
  recovered: { adopted: number, died: number }
}

/** Registers the daemon's Prometheus metrics in its registry (one per daemon, no global state). */
export function addDaemonMetrics (registry: Registry, manager: VmManager, pools: PoolManager): void {
  collectDefaultMetrics({ register: registry, prefix: 'uigniter_daemon_' })
  new Gauge({
    name: 'uigniter_vms',
    help: 'VMs by state',
    labelNames: ['state'],
    registers: [registry],
    collect () {
      this.reset()
      const counts = new Map<string, number>()
      for (const vm of manager.list({})) counts.set(vm.state, (counts.get(vm.state) ?? 0) + 1)
      for (const [state, n] of counts) this.set({ state }, n)
    }
  })
  new Gauge({
    name: 'uigniter_pool_instances',
    help: 'Pool instances by pool and state (ready, creating, claimed)',
    labelNames: ['pool', 'state'],
    registers: [registry],
    collect () {
      this.reset()
      for (const p of pools.list()) {
        for (const state of ['ready', 'creating', 'claimed'] as const) this.set({ pool: p.spec.name, state }, p[state])
      }
    }
  })
  for (const [key, help] of [['hits', 'Claims served by a ready instance'], ['misses', 'Claims that found the pool empty'], ['waits', 'Claims that queued'], ['failures', 'Instance makes and removals that failed']] as const) {
    new Gauge({
      name: `uigniter_pool_${key}_total`,
      help: `${help} (since the daemon started)`,
      labelNames: ['pool'],
      registers: [registry],
      collect () {
        this.reset()
        for (const p of pools.list()) this.set({ pool: p.spec.name }, p[key])
      }
    })
  }
  new Gauge({
    name: 'uigniter_pool_consecutive_failures',
    help: 'Instance makes that failed in a row; above 0, the pool refills after a backoff',
    labelNames: ['pool'],
    registers: [registry],
    collect () {
      this.reset()
      for (const p of pools.list()) this.set({ pool: p.spec.name }, p.consecutiveFailures)
    }
  })
  const counted = new Set<string>()
  const exits = new Counter({ name: 'uigniter_vm_exits_total', help: 'VM ends by reason', labelNames: ['reason'], registers: [registry] })
  const starts = new Counter({ name: 'uigniter_vm_starts_total', help: 'VMs started, by start path (cold boot, or clone)', labelNames: ['path'], registers: [registry] })
  manager.on('vm', (event: VmEvent) => {
    // Counted once: when the start is recorded (running, or paused for a prespawned instance).
    if ((event.vm.state === 'running' || event.vm.state === 'paused') && event.vm.startTimings !== null && event.vm.pool?.claimed !== true && !counted.has(event.vm.id)) {
      counted.add(event.vm.id)
      starts.inc({ path: event.vm.startPath })
    }
    if (event.vm.state === 'exited' || event.vm.state === 'failed') counted.delete(event.vm.id)
    if ((event.vm.state === 'exited' || event.vm.state === 'failed') && event.vm.exit !== null) exits.inc({ reason: event.vm.exit.reason })
  })
}

/**
 * The volumes' gauges, read from list() at scrape time. The four share one
 * list() per scrape (prom-client collects them together), since a volume's
 * used bytes are read from its filesystem. A failed read leaves the gauges
 * empty and is counted, rather than failing the whole scrape.
 */
export function addVolumeMetrics (registry: Registry, volumes: VolumesApi): void {
  const failures = new Counter({ name: 'uigniter_volume_metrics_failures_total', help: 'Scrapes at which the volumes could not be listed (their gauges are empty then)', registers: [registry] })
  let pending: Promise<Volume[]> | undefined
  const read = async (): Promise<Volume[]> => {
    pending ??= volumes.list().catch((err: unknown) => {
      failures.inc()
      throw err
    }).finally(() => { pending = undefined })
    return await pending.catch(() => [])
  }
  const gauge = (name: string, help: string, value: (v: Volume) => number | null): void => {
    new Gauge({
      name,
      help,
      labelNames: ['volume'],
      registers: [registry],
      async collect () {
        const list = await read()
        this.reset()
        for (const v of list) {
          const n = value(v)
          if (n !== null) this.set({ volume: v.name }, n)
        }
      }
    })
  }
  gauge('uigniter_volume_size_bytes', 'The size of the volume\'s block device', (v) => v.sizeMiB * 1024 * 1024)
  gauge('uigniter_volume_allocated_bytes', 'What the volume\'s sparse file takes on the host\'s disk', (v) => v.allocatedBytes)
  gauge('uigniter_volume_used_bytes', 'What the volume\'s filesystem says it uses, as of its last write back (absent when it cannot be read)', (v) => v.usedBytes)
  gauge('uigniter_volume_attachments', 'The live VMs the volume is attached to', (v) => v.attachments.length)
}

/** Health, info, metrics, OpenAPI and the server-sent event stream. */
export function systemRoutes (parts: { manager: VmManager, templates: TemplateManager, services: ServicesApi, pools: PoolManager, volumes: VolumesApi, info: DaemonInfo }, metrics: Registry) {
  const { manager, templates, services, pools, volumes, info } = parts
  // A volume event names its VM by name, while ?vm= is an id: the VM's record says whether they are one VM.
  const isVm = (id: string, name: string): boolean => {
    if (id === name) return true
    try {
      return manager.get(id).name === name
    } catch {
      return false
    }
  }
  return async function system (app: FastifyInstance): Promise<void> {
    app.get('/healthz', {
      schema: { tags: ['system'], summary: 'Liveness', response: { 200: Type.Object({ status: Type.Literal('ok') }) } }
    }, async () => ({ status: 'ok' as const }))

    app.get('/v1/info', { schema: { tags: ['system'], summary: 'Daemon facts: accelerator and why, network, data dir' } }, async () => info)

    app.get('/metrics', { schema: { tags: ['system'], summary: 'Prometheus metrics', hide: false } }, async (_request, reply) => {
      return await reply.type(metrics.contentType).send(await metrics.metrics())
    })

    app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger())

    app.get<{ Querystring: { vm?: string } }>('/v1/events', {
      schema: {
        tags: ['system'],
        summary: 'Server-sent events: `vm.state` with the VM record at each state change; `template.creating|created|deleted|clone-unsafe`; `service.*` with each decision of a service controller; `pool.create-failed|recovered` when a pool\'s refill fails or recovers; `volume.created|deleted|attached|detached` (with `vm`, the VM\'s name, when one is attached or detached; `?vm=` keeps those of that VM)',
        querystring: Type.Object({ vm: Type.Optional(Type.String({ description: 'Only this VM id' })) }, { additionalProperties: false })
      }
    }, async (request, reply) => {
      reply.hijack()
      const raw = reply.raw
      raw.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' })
      raw.write(': uigniter events\n\n')
      const onVm = (event: VmEvent): void => {
        if (request.query.vm !== undefined && event.vm.id !== request.query.vm) return
        raw.write(`event: ${event.type}\ndata: ${JSON.stringify(event.vm)}\n\n`)
      }
      const onTemplate = (event: TemplateEvent): void => {
        if (request.query.vm !== undefined) return
        raw.write(`event: ${event.type}\ndata: ${JSON.stringify(event.template)}\n\n`)
      }
      const onService = (event: ServiceEvent | PoolEvent): void => {
        if (request.query.vm !== undefined) return
        raw.write(`event: ${event.type}\ndata: ${JSON.stringify(event)}\n\n`)
      }
      const onVolume = (event: VolumeEvent): void => {
        if (request.query.vm !== undefined && (event.vm === undefined || !isVm(request.query.vm, event.vm))) return
        raw.write(`event: ${event.type}\ndata: ${JSON.stringify(event)}\n\n`)
      }
      // A comment every 15 s keeps proxies from closing an idle stream.
      const keepAlive = setInterval(() => raw.write(': keep-alive\n\n'), 15_000)
      manager.on('vm', onVm)
      templates.on('template', onTemplate)
      services.on('service', onService)
      pools.on('pool', onService)
      volumes.on('volume', onVolume)
      request.raw.on('close', () => {
        clearInterval(keepAlive)
        manager.off('vm', onVm)
        templates.off('template', onTemplate)
        services.off('service', onService)
        pools.off('pool', onService)
        volumes.off('volume', onVolume)
      })
    })
  }
}
