/**
 * The host network port: what the VM lifecycle asks of the host's network
 * for bridged guests. src/net/host-network.ts implements it with a Linux
 * bridge, taps, IPAM and nftables.
 */

/** What a guest gets when it is attached. */
export interface VmAttachment {
  tap: string
  mac: string
  ip: string
  prefix: number
  gateway: string
  /** IPv4 nameservers for the guest; empty when the host's resolver is on loopback, which guests cannot reach. */
  dns: string[]
}

/** A port to publish, as a VM's create request gives it. */
export interface PublishRequest {
  /** Default `127.0.0.1`; `0.0.0.0` publishes on every host address. */
  hostAddress?: string
  hostPort: number
  guestPort: number
}

export interface HostNetworking {
  /**
   * A tap, a MAC and an address for `owner` (a VM id, or `template:NAME`).
   * `dhcp: false` keeps the owner out of the bridge's DHCP table, for a guest
   * that is known to take its address otherwise.
   */
  attach: (owner: string, options?: { dhcp?: boolean }) => Promise<VmAttachment>
  /** Frees the owner's tap, published ports and, unless `releaseIp: false`, its address. Idempotent. */
  detach: (owner: string, options?: { releaseIp?: boolean }) => Promise<void>
  /** Forwards host ports to the owner's address; publishing the same forward again is a no-op. */
  publish: (owner: string, publishes: PublishRequest[]) => Promise<void>
  /** Lets guests reach these TCP ports on the gateway address (the service gateway). */
  allowHostPorts: (ports: number[]) => Promise<void>
  /** Removes taps and forwards that no live owner holds (after a crash). */
  cleanupOrphans: (liveOwners: string[]) => Promise<unknown>
}
