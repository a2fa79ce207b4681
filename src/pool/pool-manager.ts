import { EventEmitter } from 'node:events'
import { Value } from '@sinclair/typebox/value'
import { describeSchemaErrors } from '../core/config.js'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import { PoolSpecSchema, type ClaimResult, type PoolSpec, type PoolStatus } from '../core/pool.js'
import type { VmEvent, VmManager } from '../daemon/vm-manager.js'
import type { SqliteStore } from '../store/sqlite-store.js'
import { WarmPool, type EmptyPolicy, type ReleasePolicy } from './warm-pool.js'

/**
 * The daemon's warm pools. A pool's instances are ordinary VMs (marked with
 * the pool's name), so they show in `ps`, survive a daemon restart and are
 * adopted back into their pool. `prespawned` instances are QEMU processes
 * started with their vCPUs stopped, with tap, address and MAC attached: a
 * claim resumes one, and it boots from there.
 */
export class PoolManager extends EventEmitter {
  readonly #vms: VmManager
  readonly #store: SqliteStore
  readonly #log: Logger
  readonly #pools = new Map<string, { spec: PoolSpec, pool: WarmPool<string> }>()

  constructor (vms: VmManager, store: SqliteStore, log: Logger) {
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
    await this.#vms.checkImage(spec.image)
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

  /** Hands out a VM: a ready one (resumed now), or per the empty policy. */
  async claim (name: string, options: { onEmpty?: EmptyPolicy, queueTimeoutMs?: number } = {}): Promise<ClaimResult> {
    const started = performance.now()
    const { pool } = this.#get(name)
    const claim = await pool.claim(options)
    const resumeStarted = performance.now()
    const paused = this.#vms.get(claim.instance)
    if (paused.state === 'paused') await this.#vms.resume(claim.instance)
    const vm = this.#vms.markClaimed(claim.instance)
    const done = performance.now()
    this.emit('claim', { pool: name, path: claim.path })
    return { vm, path: claim.path, timings: { waitMs: claim.waitedMs, resumeMs: done - resumeStarted, totalMs: done - started } }
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
        const vm = await this.#vms.create({
          image: spec.image,
          env: {},
          network: 'bridge',
          publish: [],
          shares: [],
          ...(spec.vcpus !== undefined ? { vcpus: spec.vcpus } : {}),
          ...(spec.memoryMiB !== undefined ? { memoryMiB: spec.memoryMiB } : {})
        }, { pool: spec.name, startPaused: true })
        return vm.id
      },
      destroy: async (id) => { await this.#vms.remove(id, true).catch((err: unknown) => { this.#log.warn({ err, vm: id }, 'removing a pool VM failed') }) }
    }, spec)
    pool.on('changed', () => this.emit('changed', spec.name))
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
    this.#pools.clear()
  }
}
