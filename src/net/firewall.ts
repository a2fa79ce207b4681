import type { Subnet } from './subnet.js'

/** The name of uigniter's firewall table: cleanup is deleting it. */
export const DEFAULT_FIREWALL_TABLE = 'uigniter'

/** What the base rules protect and translate. */
export interface FirewallBase {
  /** The bridge the VMs' taps are plugged into. */
  bridge: string
  subnet: Subnet
  /** Masquerade VM traffic that leaves the host; without it, VMs reach only the bridge. */
  nat: boolean
  /**
   * TCP ports on the gateway address that VMs may connect to (e.g. the
   * service gateway). Empty by default: VMs reach no host service at all.
   */
  allowedHostPorts?: number[]
  /** Let DHCP requests from the bridge reach the host (the bridge's DHCP server); default no. */
  dhcp?: boolean
  /**
   * In a cluster: the range holding every node's VM subnet (this one's
   * included). Traffic between the bridge and it is forwarded unmasqueraded,
   * so a VM sees another node's VM by its own address; and VMs of other
   * nodes, arriving from outside the bridge, reach this host's services no
   * more than local VMs do (the allowed ports alone). Unset on a single host.
   */
  clusterRange?: Subnet
  /**
   * In a cluster: the other nodes' own addresses (where their APIs, gateways
   * and etcd listen). VM traffic to them is not masqueraded, so their guards
   * see a VM; and it is forwarded only to the allowed ports, so that NAT does
   * not make a VM's connection to another node look like this host's.
   */
  clusterNodes?: string[]
}

/** One TCP port forward from the host to a VM. */
export interface PortPublish {
  /** `0.0.0.0` for every host address, else one address of the host (`127.0.0.1` included). */
  hostAddress: string
  hostPort: number
  vmIp: string
  guestPort: number
}

/** A port forward as found in the firewall, with the VM it belongs to. */
export interface PublishedPort extends PortPublish {
  vmId: string
}

/**
 * NAT and isolation for the bridge network. The implementation keeps every
 * rule in its own table(s), so setting up is idempotent and removing
 * uigniter's rules is deleting those tables.
 */
export interface Firewall {
  /** Which tool does the work. */
  readonly backend: 'nftables' | 'iptables'
  /**
   * Installs (or replaces) the base rules: egress masquerade when `nat`,
   * forwarding, loopback access to published ports, and isolation (VMs cannot
   * reach host services, nor published ports through the host). Keeps the
   * published ports. Idempotent.
   */
  ensureBase(base: FirewallBase): Promise<void>
  /**
   * Forwards `hostAddress:hostPort` to `vmIp:guestPort` for traffic from
   * elsewhere and from the host itself, `127.0.0.1` included. Throws
   * UIG_ERR_NET_PORT_IN_USE when the port is published already or a host
   * program listens on it. Publishing the same forward again for the same VM
   * is a no-op.
   */
  publish(vmId: string, rule: PortPublish): Promise<void>
  /** Removes one port forward of the VM; no-op when absent. */
  unpublish(vmId: string, rule: PortPublish): Promise<void>
  /** Removes every port forward of the VM; no-op when it has none. */
  unpublishAll(vmId: string): Promise<void>
  /** Every port forward in place. */
  listPublished(): Promise<PublishedPort[]>
  /**
   * Makes the port forwards match `expected`: removes those of VMs not in the
   * list (orphans of a crashed daemon) and, for VMs that list `publishes`,
   * removes the ones not listed and adds the missing ones. A VM listed
   * without `publishes` keeps what it has.
   */
  reconcile(expected: Array<{ vmId: string, publishes?: PortPublish[] }>): Promise<void>
  /** Deletes every rule uigniter installed (its tables). */
  destroy(): Promise<void>
}
