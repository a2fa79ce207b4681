import { UigniterError } from '../core/errors.js'
import type { Subnet } from './subnet.js'

/**
 * Where IP allocations persist, so that no address is handed out twice, also
 * across daemon restarts. The daemon implements it over its database.
 */
export interface IpAllocationStore {
  /** Every allocation, in any order. */
  list(): Array<{ ip: string, owner: string }>
  /**
   * Records `ip` for `owner`; false when the address is taken already. Must be
   * atomic (e.g. an INSERT on a UNIQUE column): two allocators racing for the
   * same address must not both win.
   */
  reserve(ip: string, owner: string): boolean
  /** Forgets one allocation; no-op when absent. */
  release(ip: string): void
  /** Forgets every allocation of `owner`; no-op when it has none. */
  releaseOwner(owner: string): void
}

/**
 * Hands out the addresses of a subnet to VMs: the lowest free one, never the
 * network, gateway or broadcast address. Idempotent per owner: a VM asking
 * again gets the address it has.
 *
 * @example
 * const ipam = new Ipam(Subnet.parseForVms('10.77.0.0/24'), store)
 * ipam.allocate('vm-a') // '10.77.0.2'
 * ipam.allocate('vm-a') // '10.77.0.2' again
 * ipam.release('vm-a')
 */
export class Ipam {
  readonly subnet: Subnet
  readonly #store: IpAllocationStore

  constructor (subnet: Subnet, store: IpAllocationStore) {
    this.subnet = subnet
    this.#store = store
  }

  /**
   * The address of `owner`, allocating the lowest free one when it has none.
   * Throws UIG_ERR_NET_POOL_EXHAUSTED when every address is taken.
   */
  allocate (owner: string): string {
    return this.claim(owner).ip
  }

  /**
   * allocate(), saying whether the address is new to the owner (a caller
   * that fails later gives back only what it took), with one read of the
   * store rather than a lookup and an allocation.
   */
  claim (owner: string): { ip: string, isNew: boolean } {
    if (owner === '') throw new TypeError('an IP allocation needs an owner')
    const allocations = this.#store.list()
    const own = allocations.filter((a) => a.owner === owner)
    const current = own.find((a) => this.subnet.contains(a.ip))
    if (current !== undefined) return { ip: current.ip, isNew: false }
    // An address from a subnet configured before is useless on today's bridge.
    for (const stale of own) this.#store.release(stale.ip)

    const taken = new Set(allocations.map((a) => a.ip))
    for (const ip of this.#candidates()) {
      // reserve() may still lose to another allocator that listed before us.
      if (!taken.has(ip) && this.#store.reserve(ip, owner)) return { ip, isNew: true }
    }
    const inUse = this.#store.list().filter((a) => this.subnet.contains(a.ip)).length
    throw new UigniterError('UIG_ERR_NET_POOL_EXHAUSTED',
      `no free address in ${this.subnet.cidr}: ${inUse} of ${this.capacity} in use; ` +
      'remove VMs you no longer need, or configure a larger network.subnet (e.g. a /16)')
  }

  /** The address of `owner`, or undefined when it has none in this subnet. */
  lookup (owner: string): string | undefined {
    return this.#store.list().find((a) => a.owner === owner && this.subnet.contains(a.ip))?.ip
  }

  /** Frees every address of `owner`; no-op when it has none. */
  release (owner: string): void {
    this.#store.releaseOwner(owner)
  }

  /** How many VMs the subnet can address: its hosts minus the gateway. */
  get capacity (): number {
    return Math.max(0, this.subnet.hostCount - 1)
  }

  * #candidates (): Generator<string> {
    for (const ip of this.subnet.hosts()) {
      if (ip !== this.subnet.gateway) yield ip
    }
  }
}
