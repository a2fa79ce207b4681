import type { IpAllocationStore } from '../../src/net/ipam.js'

/**
 * A second implementation of the IP allocation port, in memory, for tests;
 * the daemon's persists in SQLite. Single-threaded, so reserve() is atomic.
 */
export class InMemoryIpAllocationStore implements IpAllocationStore {
  readonly byIp = new Map<string, string>()

  list (): Array<{ ip: string, owner: string }> {
    return [...this.byIp].map(([ip, owner]) => ({ ip, owner }))
  }

  reserve (ip: string, owner: string): boolean {
    if (this.byIp.has(ip)) return false
    this.byIp.set(ip, owner)
    return true
  }

  release (ip: string): void {
    this.byIp.delete(ip)
  }

  releaseOwner (owner: string): void {
    for (const [ip, o] of this.byIp) if (o === owner) this.byIp.delete(ip)
  }
}
