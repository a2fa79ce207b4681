import { EventEmitter } from 'node:events'
import { Value } from '@sinclair/typebox/value'
import { describeSchemaErrors } from '../core/config.js'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import { PoolSpecSchema, type ClaimResult, type PoolSpec, type PoolStatus } from '../core/pool.js'
import type { StateStore } from '../core/ports/state-store.js'
import type { StartStep } from '../core/vm.js'
import type { VmEvent, VmManager } from '../vm/vm-manager.js'
import { WarmPool, type CreateFailure, type EmptyPolicy, type ReleasePolicy } from './warm-pool.js'

/** A pool's refill failed or recovered; on /v1/events. */
export interface PoolEvent {
  type: 'pool.create-failed' | 'pool.recovered'
  pool: string
  message: string
  at: string
}

/**
 * The daemon's warm pools. A pool's instances are ordinary VMs (marked with
 * the pool's name), so they show in `ps`, survive a daemon restart and are
 * adopted back into their pool. What a claim does depends on the kind:
 * - `prespawned`: QEMU started with its vCPUs stopped, with tap, address
 *   and MAC attached; the claim resumes it and it boots from there;
 * - `booted`: the guest booted and its init holds the app back; the claim
 *   gives it its identity (and env), and the app starts;
 * - `clone`: a clone of a template, app started; the claim hands it out.
 * Events: 'changed' (pool name) after any change of its counts; 'pool'
 * (PoolEvent) when its refill fails or recovers; 'claim'.
 */
export class PoolManager extends EventEmitter {
  readonly #vms: VmManager
  readonly #store: StateStore
  readonly #log: Logger
  readonly #pools = new Map<string, { spec: PoolSpec, pool: WarmPool<string> }>()

  constructor (vms: VmManager, store: StateStore, log: Logger) {
    super()
    this.#vms = vms
    this.#store = store
    this.#log = log
    vms.on('vm', (event: VmEvent) => {
      const { vm } = event
      if (vm.pool === null || (vm.state !== 'exited' && vm.state !== 'failed')) return
      this.#pools.get(vm.pool.name)?.pool.discard(vm.id)
    })
  }

  /** After a restart: the saved pools, with their live VMs adopted back, then refilled. */
  restore (): void {
    for (const spec of this.#store.listPools()) {
      const entry = this.#open(spec)
      for (const vm of this.#vms.list({ state: ['starting', 'running', 'paused', 'stopping'] })) {
        if (vm.pool?.name === spec.name) entry.pool.adopt(vm.id, vm.pool.claimed)
      }
      entry.pool.start()
    }
  }

  /** Validates and saves a pool, then starts filling it. */
  async create (input: unknown): Promise<PoolStatus> {
    const spec = Value.Default(PoolSpecSchema, structuredClone(input))
    if (!Value.Check(PoolSpecSchema, spec)) {
      throw new UigniterError('UIG_ERR_POOL_POLICY_INVALID', `invalid pool: ${describeSchemaErrors(PoolSpecSchema, spec)}`)
    }
    if (spec.min > spec.max) throw new UigniterError('UIG_ERR_POOL_POLICY_INVALID', `invalid pool: min (${spec.min}) is larger than max (${spec.max})`)
    if (spec.kind === 'clone') {
      if (spec.template === undefined || spec.image !== undefined || spec.vcpus !== undefined || spec.memoryMiB !== undefined) {
        throw new UigniterError('UIG_ERR_POOL_POLICY_INVALID', 'invalid pool: a clone pool names a template, and takes its image, vCPUs and memory from it')
      }
      await this.#vms.checkTemplate(spec.template)
    } else {
      if (spec.image === undefined || spec.template !== undefined) {
        throw new UigniterError('UIG_ERR_POOL_POLICY_INVALID', `invalid pool: a ${spec.kind} pool names an image, and no template (templates make clone pools)`)
      }
      await this.#vms.checkImage(spec.image)
    }
    this.#store.insertPool(spec)
    const entry = this.#open(spec)
    entry.pool.start()
    return this.status(spec.name)
  }

  list (): PoolStatus[] {
    return [...this.#pools.keys()].sort().map((name) => this.status(name))
  }

  status (name: string): PoolStatus {
    const { spec, pool } = this.#get(name)
    return { spec, ...pool.stats() }
  }

  async resize (name: string, bounds: { min?: number, max?: number }): Promise<PoolStatus> {
    const entry = this.#get(name)
    const min = bounds.min ?? entry.spec.min
    const max = bounds.max ?? entry.spec.max
    await entry.pool.resize(min, max)
    entry.spec = { ...entry.spec, min, max }
    this.#store.updatePool(entry.spec)
    return this.status(name)
  }

  /** Deletes the pool and its ready instances; claimed VMs stay, no longer part of a pool. */
  async remove (name: string): Promise<PoolStatus> {
    const status = this.status(name)
    const entry = this.#get(name)
    this.#pools.delete(name)
    this.#store.deletePool(name)
    await entry.pool.close()
    return status
  }

  /**
   * Hands out a VM: a ready one, or per the empty policy. A booted
   * instance takes its identity and `env` now; other kinds started theirs.
   */
  async claim (name: string, options: { onEmpty?: EmptyPolicy, queueTimeoutMs?: number, env?: Record<string, string> } = {}): Promise<ClaimResult> {
    const started = performance.now()
    const { spec, pool } = this.#get(name)
    if (options.env !== undefined && Object.keys(options.env).length > 0 && spec.kind !== 'booted') {
      throw new UigniterError('UIG_ERR_API_VALIDATION', `pool ${name} is a ${spec.kind} pool, whose apps start without a claim's env; only booted pools take env at claim`)
    }
    const claim = await pool.claim(options)
    const handOverStarted = performance.now()
    // The claim's own steps, listed after the instance's start (core/start-steps.ts CLAIM_STEPS).
    const steps: StartStep[] = [{ name: 'claim-wait', ms: claim.waitedMs }]
    const timed = async (name: StartStep['name'], step: () => Promise<unknown>): Promise<void> => {
      const t = performance.now()
      await step()
      steps.push({ name, ms: performance.now() - t })
    }
    try {
      if (spec.kind === 'prespawned' && this.#vms.get(claim.instance).state === 'paused') await timed('resume', async () => await this.#vms.resume(claim.instance))
      if (spec.kind === 'booted') await timed('identity', async () => await this.#vms.assign(claim.instance, options.env))
    } catch (err) {
      // Never hand out an instance that did not take its assignment.
      await pool.release(claim.instance, { onRelease: 'recycle' }).catch(() => {})
      throw err
    }
    const path = claim.path === 'pool' ? 'pool' : spec.kind === 'clone' ? 'clone' : 'cold'
    steps.push({ name: 'hand-out', ms: 0 })
    const vm = this.#vms.markClaimed(claim.instance, path, { steps, totalMs: performance.now() - started })
    const done = performance.now()
    this.emit('claim', { pool: name, path })
    return { vm, path, timings: { waitMs: claim.waitedMs, resumeMs: done - handOverStarted, totalMs: done - started } }
  }

  /** Gives a claimed VM back: destroyed, or destroyed and replaced by a fresh one (recycle). */
  async release (name: string, vmId: string, options: { onRelease?: ReleasePolicy } = {}): Promise<void> {
    const { pool } = this.#get(name)
    const vm = this.#vms.get(vmId)
    await pool.release(vm.id, options)
  }

  #open (spec: PoolSpec): { spec: PoolSpec, pool: WarmPool<string> } {
    const pool = new WarmPool<string>({
      create: async () => {
        const vm = await this.#vms.createForPool(spec.kind, {
          ...(spec.kind === 'clone' ? { template: spec.template } : { image: spec.image }),
          env: {},
          network: 'bridge',
          publish: [],
          shares: [],
          ...(spec.vcpus !== undefined ? { vcpus: spec.vcpus } : {}),
          ...(spec.memoryMiB !== undefined ? { memoryMiB: spec.memoryMiB } : {})
        }, spec.name)
        return vm.id
      },
      destroy: async (id) => { await this.#vms.remove(id, true).catch((err: unknown) => { this.#log.warn({ err, vm: id }, 'removing a pool VM failed') }) }
    }, spec)
    pool.on('changed', () => this.emit('changed', spec.name))
    pool.on('create-failed', (failure: CreateFailure) => {
      const message = `making an instance failed (${failure.consecutiveFailures} in a row): ${failure.error.message}; the refill tries again in ${Math.round(failure.retryInMs / 100) / 10} s`
      this.#log.warn({ err: failure.error, pool: spec.name, consecutiveFailures: failure.consecutiveFailures, retryInMs: failure.retryInMs }, message)
      this.emit('pool', { type: 'pool.create-failed', pool: spec.name, message, at: new Date().toISOString() } satisfies PoolEvent)
    })
    pool.on('recovered', () => {
      const message = 'an instance was made again after failures; the refill is back to normal'
      this.#log.info({ pool: spec.name }, message)
      this.emit('pool', { type: 'pool.recovered', pool: spec.name, message, at: new Date().toISOString() } satisfies PoolEvent)
    })
    const entry = { spec, pool }
    this.#pools.set(spec.name, entry)
    return entry
  }

  #get (name: string): { spec: PoolSpec, pool: WarmPool<string> } {
    const entry = this.#pools.get(name)
    if (entry === undefined) throw new UigniterError('UIG_ERR_POOL_NOT_FOUND', `no pool is named "${name}"; "uigniter pool ls" lists them`)
    return entry
  }

  /** Stops refilling; VMs keep running and are adopted by the next daemon. */
  close (): void {
    for (const { pool } of this.#pools.values()) pool.stop()
    this.#pools.clear()
  }
}
