import { readFile, readlink } from 'node:fs/promises'
import { UigniterError, hasErrno } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import { DEFAULT_BRIDGE, deleteBridge, ensureBridge } from './bridge.js'
import type { DhcpHost, DhcpHosts } from './dhcp-hosts.js'
import { detectFirewall } from './detect-firewall.js'
import { DEFAULT_FIREWALL_TABLE, type Firewall, type PortPublish, type PublishedPort } from './firewall.js'
import { Ipam, type IpAllocationStore } from './ipam.js'
import { macForVm } from '../core/mac-address.js'
import { NOT_ROOT_ADVICE } from './net-tool.js'
import { DEFAULT_SUBNET, Subnet, parseIpv4 } from './subnet.js'
import { DEFAULT_TAP_PREFIX, createTap, deleteTap, listTaps, tapNameFor } from './tap.js'
import type { HostNetworking, PublishRequest, VmAttachment } from '../core/ports/host-networking.js'

/** How HostNetwork is configured; the daemon fills it from the `network` section of its config. */
export interface HostNetworkOptions {
  /** Bridge name; default `uigniter0`. */
  bridge?: string
  /** The VMs' subnet (private, /16../29); default `10.77.0.0/24`. */
  subnet?: string
  /** Masquerade VM traffic leaving the host. */
  nat: boolean
  /** Where IP allocations persist. */
  store: IpAllocationStore
  /** TCP ports on the gateway address VMs may reach (e.g. the service gateway); default none. */
  allowedHostPorts?: number[]
  /**
   * In a cluster, the range holding every node's VM subnet, this one's
   * included (e.g. `10.78.0.0/16`): VMs of other nodes are routed to
   * unmasqueraded and kept from this host's services as local VMs are.
   */
  clusterRange?: string
  /** Taps are named this plus a hash of the VM id; default `uig`. Orphan cleanup deletes unknown taps with it. */
  tapPrefix?: string
  /** The firewall's table name; default `uigniter`. */
  firewallTable?: string
  /** A firewall to use instead of detecting the host's. */
  firewall?: Firewall
  /** Where the host's nameservers are read from; default `/etc/resolv.conf`. */
  resolvConf?: string
  logger?: Logger
}

/** What a VM needs to join the bridge network: QEMU takes `tap` and `mac`, the guest the rest. */
/** What a VM gets when it is attached (the port's VmAttachment). */
export type VmNetwork = VmAttachment

/**
 * The host side of bridge networking, for the daemon: one bridge with the
 * subnet's gateway address, a tap and an address per VM, port publishing and
 * isolation in the firewall, and cleanup of what a crashed daemon left.
 *
 * @example
 * const network = new HostNetwork({ nat: true, store })
 * await network.setup()
 * await network.cleanupOrphans(liveVmIds)
 * const { tap, mac, ip } = await network.attach(vm.id)
 * await network.publish(vm.id, [{ hostPort: 8080, guestPort: 80 }])
 * await network.detach(vm.id)
 */
export class HostNetwork implements HostNetworking {
  readonly bridge: string
  readonly subnet: Subnet
  readonly clusterRange: Subnet | undefined
  readonly ipam: Ipam
  readonly #options: HostNetworkOptions
  readonly #tapPrefix: string
  #firewall: Firewall | undefined
  #allowedHostPorts: number[]
  #clusterNodes: string[] = []
  #dhcp: DhcpHosts | undefined
  /**
   * Owners attached with `dhcp: false` (guests that take their address from
   * the kernel command line or the identity): left out of the DHCP table, so
   * that starting and ending them does not rewrite it. Forgotten with the
   * daemon, which then lists every owner, as before.
   */
  readonly #noDhcp = new Set<string>()
  /** Each owner's MAC, hashed once: the DHCP table lists every owner at every change. */
  readonly #macs = new Map<string, string>()

  constructor (options: HostNetworkOptions) {
    this.#options = options
    this.bridge = options.bridge ?? DEFAULT_BRIDGE
    this.subnet = Subnet.parseForVms(options.subnet ?? DEFAULT_SUBNET)
    this.clusterRange = options.clusterRange === undefined ? undefined : Subnet.parse(options.clusterRange)
    if (this.clusterRange !== undefined && (this.clusterRange.prefix > this.subnet.prefix || !this.clusterRange.contains(this.subnet.network))) {
      throw new UigniterError('UIG_ERR_NET_INVALID_SUBNET', `the cluster range ${this.clusterRange.cidr} must hold this node's subnet ${this.subnet.cidr}; give each node a subnet out of it`)
    }
    this.ipam = new Ipam(this.subnet, options.store)
    this.#tapPrefix = options.tapPrefix ?? DEFAULT_TAP_PREFIX
    this.#firewall = options.firewall
    this.#allowedHostPorts = [...(options.allowedHostPorts ?? [])]
  }

  /**
   * Creates or checks the bridge and installs the firewall's base rules.
   * Idempotent; run it at every daemon start, before cleanupOrphans().
   * Throws UIG_ERR_HOST_NOT_ROOT when not root.
   */
  async setup (): Promise<void> {
    if (process.geteuid?.() !== 0) {
      throw new UigniterError('UIG_ERR_HOST_NOT_ROOT', `bridge networking needs root: ${NOT_ROOT_ADVICE}`)
    }
    await ensureBridge({ name: this.bridge, subnet: this.subnet })
    await this.#ensureBase()
    this.#options.logger?.info({ bridge: this.bridge, subnet: this.subnet.cidr, clusterRange: this.clusterRange?.cidr, nat: this.#options.nat, firewall: this.#firewall?.backend }, 'host network ready')
  }

  /**
   * Replaces the TCP ports on the gateway address that VMs may reach (the
   * service gateway's HTTP port and its TCP service ports). Idempotent.
   */
  async allowHostPorts (ports: number[]): Promise<void> {
    const sorted = [...new Set(ports)].sort((a, b) => a - b)
    if (sorted.join() === this.#allowedHostPorts.join()) return
    this.#allowedHostPorts = sorted
    await this.#ensureBase()
  }

  /**
   * In a cluster: replaces the other nodes' own addresses, which VMs then
   * reach unmasqueraded and on the allowed ports only (see FirewallBase's
   * clusterNodes). Call it with the peers given to ClusterRoutes. Idempotent.
   */
  async setClusterNodes (addresses: string[]): Promise<void> {
    const sorted = [...new Set(addresses)].sort()
    if (sorted.join() === this.#clusterNodes.join()) return
    for (const address of sorted) {
      if (parseIpv4(address) === undefined) throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `cluster node address "${address}" is not an IPv4 address`)
    }
    this.#clusterNodes = sorted
    await this.#ensureBase()
  }

  async #ensureBase (): Promise<void> {
    this.#firewall ??= await detectFirewall({ table: this.#options.firewallTable ?? DEFAULT_FIREWALL_TABLE })
    await this.#firewall.ensureBase({ bridge: this.bridge, subnet: this.subnet, nat: this.#options.nat, allowedHostPorts: this.#allowedHostPorts, dhcp: this.#dhcp !== undefined, ...(this.clusterRange === undefined ? {} : { clusterRange: this.clusterRange, clusterNodes: this.#clusterNodes }) })
  }

  /**
   * Keeps a DHCP server's table (a DhcpServer) in step with the addresses
   * from now on: every attach, detach and cleanup rewrites it, before the
   * VM's QEMU starts. Opens the firewall to DHCP requests from the bridge.
   * Call after setup().
   */
  async useDhcp (hosts: DhcpHosts): Promise<void> {
    this.#dhcp = hosts
    await this.#ensureBase()
    await this.#syncDhcp()
  }

  /** What the DHCP server must answer: every allocated address in the subnet, with its owner's MAC (bar owners attached without DHCP). */
  dhcpHosts (): DhcpHost[] {
    return this.#options.store.list().filter((a) => this.subnet.contains(a.ip) && !this.#noDhcp.has(a.owner)).map((a) => ({ mac: this.#macOf(a.owner), ip: a.ip }))
  }

  #macOf (owner: string): string {
    let mac = this.#macs.get(owner)
    if (mac === undefined) {
      mac = macForVm(owner)
      // Bounded by the owners alive: detach forgets them; a guard for the ones it never sees.
      if (this.#macs.size > 65_536) this.#macs.clear()
      this.#macs.set(owner, mac)
    }
    return mac
  }

  async #syncDhcp (): Promise<void> {
    if (this.#dhcp === undefined) return
    try {
      await this.#dhcp.setHosts(this.dhcpHosts())
    } catch (err) {
      // Only DHCP clients need the table; a VM that takes its address from the command line must still start.
      this.#options.logger?.warn({ err }, 'updating the DHCP server\'s hosts failed; VMs that use DHCP may get no address')
    }
  }

  /**
   * Gives the VM its address (the one it has, if any) and a tap on the
   * bridge, and tells the bridge the address's MAC (an address that belonged
   * to a VM with another MAC moments ago would otherwise be blackholed until
   * the host's neighbour entry expired). Idempotent, so a re-adopted VM gets
   * the same answer. One `ip` process. `dhcp: false` for a guest that takes
   * its address otherwise (our init does, from its command line or its
   * identity): then the DHCP table is not rewritten for it. Throws
   * UIG_ERR_NET_POOL_EXHAUSTED when the subnet is full.
   */
  async attach (vmId: string, options: { dhcp?: boolean } = {}): Promise<VmNetwork> {
    const { ip, isNew } = this.ipam.claim(vmId)
    const tap = tapNameFor(vmId, this.#tapPrefix)
    const mac = this.#macOf(vmId)
    try {
      await createTap(tap, this.bridge, { ip, mac })
    } catch (err) {
      if (isNew) this.ipam.release(vmId)
      throw err
    }
    const listed = !this.#noDhcp.has(vmId)
    if (options.dhcp === false) this.#noDhcp.add(vmId)
    else this.#noDhcp.delete(vmId)
    // A new owner without DHCP changes nothing in the table; one that was in it must leave it.
    if (options.dhcp !== false || (listed && !isNew)) await this.#syncDhcp()
    return { tap, mac, ip, prefix: this.subnet.prefix, gateway: this.subnet.gateway, dns: await this.nameservers() }
  }

  /**
   * Removes the VM's published ports and its tap and, unless told to keep
   * it, frees its address. Idempotent.
   */
  async detach (vmId: string, options: { releaseIp?: boolean } = {}): Promise<void> {
    await this.#requireFirewall().unpublishAll(vmId)
    await deleteTap(tapNameFor(vmId, this.#tapPrefix))
    if (options.releaseIp ?? true) {
      this.ipam.release(vmId)
      this.#macs.delete(vmId)
      const listed = !this.#noDhcp.delete(vmId)
      if (listed) await this.#syncDhcp()
    }
  }

  /**
   * Publishes host ports to the attached VM: all of them, or none (a clash
   * undoes the ones this call added). Throws UIG_ERR_NET_PORT_IN_USE,
   * UIG_ERR_NET_PUBLISH_INVALID or UIG_ERR_NET_NOT_ATTACHED.
   */
  async publish (vmId: string, publishes: PublishRequest[]): Promise<void> {
    const firewall = this.#requireFirewall()
    const vmIp = this.ipam.lookup(vmId)
    if (vmIp === undefined) {
      throw new UigniterError('UIG_ERR_NET_NOT_ATTACHED', `VM ${vmId} has no address on bridge ${this.bridge}; ports can be published only for VMs with network: bridge`)
    }
    const rules: PortPublish[] = publishes.map((p) => ({ hostAddress: p.hostAddress ?? '127.0.0.1', hostPort: p.hostPort, vmIp, guestPort: p.guestPort }))
    rules.forEach((rule, i) => {
      const twin = rules.findIndex((r) => r.hostPort === rule.hostPort && (r.hostAddress === rule.hostAddress || r.hostAddress === '0.0.0.0' || rule.hostAddress === '0.0.0.0'))
      if (twin !== i) {
        throw new UigniterError('UIG_ERR_NET_PORT_IN_USE', `host port ${rule.hostAddress}:${rule.hostPort} is published twice in the same request`)
      }
    })
    const before = (await firewall.listPublished()).filter((p) => p.vmId === vmId)
    const added: PortPublish[] = []
    try {
      for (const rule of rules) {
        await firewall.publish(vmId, rule)
        if (!before.some((p) => sameForward(p, rule))) added.push(rule)
      }
    } catch (err) {
      for (const rule of added) await firewall.unpublish(vmId, rule)
      throw err
    }
  }

  /**
   * Removes what a crashed daemon left behind: taps with our prefix and
   * firewall rules of VMs not in `liveVmIds`. IP allocations stay: they are
   * the caller's to release through the store. Returns what was removed.
   */
  async cleanupOrphans (liveVmIds: string[]): Promise<{ taps: string[], publishes: PublishedPort[] }> {
    const live = new Set(liveVmIds)
    const liveTaps = new Set(liveVmIds.map((id) => tapNameFor(id, this.#tapPrefix)))
    const taps: string[] = []
    for (const name of await listTaps(this.#tapPrefix)) {
      // Another daemon (on another bridge) owns taps with the same prefix: leave those alone.
      const master = await readlink(`/sys/class/net/${name}/master`).then((p) => p.split('/').pop(), () => undefined)
      if (!liveTaps.has(name) && (master === undefined || master === this.bridge)) taps.push(name)
    }
    for (const name of taps) await deleteTap(name)
    const firewall = this.#requireFirewall()
    const publishes = (await firewall.listPublished()).filter((p) => !live.has(p.vmId))
    await firewall.reconcile(liveVmIds.map((vmId) => ({ vmId })))
    // The caller released the addresses of dead VMs before: the DHCP server forgets them too.
    await this.#syncDhcp()
    if (taps.length > 0 || publishes.length > 0) {
      this.#options.logger?.info({ taps, publishes: publishes.map((p) => `${p.vmId} ${p.hostAddress}:${p.hostPort}`) }, 'removed orphaned network resources')
    }
    return { taps, publishes }
  }

  /**
   * Removes everything this network put on the host: the firewall rules,
   * every tap with our prefix, and the bridge. IP allocations stay in the store.
   */
  async teardown (): Promise<void> {
    const firewall = this.#firewall ?? await detectFirewall({ table: this.#options.firewallTable ?? DEFAULT_FIREWALL_TABLE })
    await firewall.destroy()
    for (const name of await listTaps(this.#tapPrefix)) await deleteTap(name)
    await deleteBridge(this.bridge)
  }

  /**
   * The host's IPv4 nameservers that guests can reach: those of
   * /etc/resolv.conf, except loopback ones (a local stub resolver such as
   * systemd-resolved's 127.0.0.53 is not reachable from a VM).
   */
  async nameservers (): Promise<string[]> {
    let text: string
    try {
      text = await readFile(this.#options.resolvConf ?? '/etc/resolv.conf', 'utf8')
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) return []
      throw err
    }
    const servers: string[] = []
    for (const line of text.split('\n')) {
      const [keyword, address] = line.trim().split(/\s+/)
      if (keyword !== 'nameserver' || address === undefined) continue
      const value = parseIpv4(address)
      if (value === undefined || value >>> 24 === 127 || value === 0) continue
      // The C library reads at most three.
      if (!servers.includes(address) && servers.length < 3) servers.push(address)
    }
    return servers
  }

  #requireFirewall (): Firewall {
    if (this.#firewall === undefined) throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', 'the host network is not set up yet; call setup() first')
    return this.#firewall
  }
}

function sameForward (a: PortPublish, b: PortPublish): boolean {
  return a.hostAddress === b.hostAddress && a.hostPort === b.hostPort && a.vmIp === b.vmIp && a.guestPort === b.guestPort
}
