import { readFile, writeFile } from 'node:fs/promises'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import { ipJson, runIpBatchAll } from './net-tool.js'
import { Subnet, parseIpv4 } from './subnet.js'

/**
 * The routing protocol number our routes carry (a private one: iproute2
 * names none above 99 bar kernel-reserved ones). It is the record: after a
 * restart `ip route show proto 177` lists what is ours, with no state file.
 */
export const CLUSTER_ROUTE_PROTO = 177

/** A peer node: its VM subnet is reached through its address on the shared link. */
export interface RoutePeer {
  node: string
  subnet: string
  via: string
}

interface IpRoute { dst?: string, gateway?: string, dev?: string, protocol?: string | number }

/**
 * Routes from this node to every other node's VM subnet, so that a VM's
 * address is reachable from every node and every other VM without NAT.
 * It needs the nodes to share a link (or a router that knows the subnets):
 * each `via` must be on-link. Operations run one at a time.
 *
 * @example
 * const routes = new ClusterRoutes({ ownSubnet: '10.78.1.0/24', logger })
 * await routes.sync([{ node: 'n2', subnet: '10.78.2.0/24', via: '192.168.250.12' }])
 * await routes.sync([]) // n2 left: its route goes
 */
export class ClusterRoutes {
  readonly ownSubnet: Subnet
  readonly #logger: Logger
  #queue: Promise<unknown> = Promise.resolve()

  constructor (options: { ownSubnet: string, logger: Logger }) {
    this.ownSubnet = Subnet.parseForVms(options.ownSubnet)
    this.#logger = options.logger
  }

  /**
   * Makes our routes exactly the peers' subnets via their addresses: adds or
   * replaces what differs, deletes ours for peers no longer listed. One
   * listing, and one `ip -batch` when anything changed. Refuses the whole
   * list (UIG_ERR_NET_SETUP_FAILED, nothing changed) when a peer's subnet
   * overlaps ours or another peer's; a route the kernel refuses (a `via`
   * that is not on-link) fails the call after the others were applied.
   */
  async sync (peers: RoutePeer[]): Promise<void> {
    const wanted = this.#validate(peers)
    await this.#serial(async () => {
      await enableForwarding()
      const current = await listOurRoutes()
      const commands: string[] = []
      for (const [dst, { via }] of wanted) {
        if (current.get(dst) !== via) commands.push(`route replace ${dst} via ${via} proto ${CLUSTER_ROUTE_PROTO}`)
      }
      for (const dst of current.keys()) {
        if (!wanted.has(dst)) commands.push(`route del ${dst} proto ${CLUSTER_ROUTE_PROTO}`)
      }
      if (commands.length === 0) return
      const failures = await runIpBatchAll(commands)
      const failed = new Set(failures.map((f) => f.index))
      const applied = commands.filter((_c, i) => !failed.has(i))
      if (applied.length > 0) this.#logger.info({ changes: applied }, 'cluster routes updated')
      if (failures.length > 0) {
        const said = failures.map((f) => `"ip ${f.command}": ${f.message}`).join('; ')
        throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `routes to peer nodes failed (${said}); each peer's address must be on a link this node shares (routing needs one; a VXLAN overlay is the way otherwise)`)
      }
    })
  }

  /** Deletes every route of ours (the node leaves the cluster). Idempotent. */
  async clear (): Promise<void> {
    await this.#serial(async () => {
      const current = await listOurRoutes()
      if (current.size === 0) return
      const failures = await runIpBatchAll([...current.keys()].map((dst) => `route del ${dst} proto ${CLUSTER_ROUTE_PROTO}`))
      // Gone meanwhile is what we wanted.
      const real = failures.filter((f) => !/No such process/.test(f.message))
      if (real.length > 0) throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `removing cluster routes failed: ${real.map((f) => `"ip ${f.command}": ${f.message}`).join('; ')}`)
      this.#logger.info({ removed: [...current.keys()] }, 'cluster routes removed')
    })
  }

  /** Each peer's subnet in canonical form, with its next hop; throws before anything is touched. */
  #validate (peers: RoutePeer[]): Map<string, RoutePeer & { subnetOf: Subnet }> {
    const wanted = new Map<string, RoutePeer & { subnetOf: Subnet }>()
    const refuse = (message: string): UigniterError => new UigniterError('UIG_ERR_NET_SETUP_FAILED', message)
    for (const peer of peers) {
      let subnet: Subnet
      try {
        subnet = Subnet.parseForVms(peer.subnet)
      } catch (err) {
        throw refuse(`node ${peer.node}'s subnet is not usable: ${(err as Error).message}`)
      }
      if (parseIpv4(peer.via) === undefined) throw refuse(`node ${peer.node}'s address "${peer.via}" is not an IPv4 address`)
      if (subnet.overlaps(this.ownSubnet)) {
        throw refuse(`node ${peer.node}'s subnet ${subnet.cidr} overlaps this node's ${this.ownSubnet.cidr}; every node needs its own subnet out of the cluster range`)
      }
      if (subnet.contains(peer.via)) throw refuse(`node ${peer.node}'s address ${peer.via} lies inside its own VM subnet ${subnet.cidr}; give its address on the link the nodes share`)
      for (const other of wanted.values()) {
        if (other.subnetOf.overlaps(subnet)) throw refuse(`nodes ${other.node} and ${peer.node} have overlapping subnets (${other.subnetOf.cidr}, ${subnet.cidr})`)
      }
      wanted.set(subnet.cidr, { ...peer, subnetOf: subnet })
    }
    return wanted
  }

  async #serial<T> (task: () => Promise<T>): Promise<T> {
    const result = this.#queue.then(task)
    this.#queue = result.catch(() => undefined)
    return await result
  }
}

/** Our routes in the main table: destination → next hop. */
async function listOurRoutes (): Promise<Map<string, string | undefined>> {
  const routes = await ipJson<IpRoute>(['-4', 'route', 'show', 'proto', String(CLUSTER_ROUTE_PROTO)]) ?? []
  const map = new Map<string, string | undefined>()
  // `ip` prints a /32 without its length.
  for (const r of routes) if (r.dst !== undefined) map.set(r.dst.includes('/') ? r.dst : `${r.dst}/32`, r.gateway)
  return map
}

/** Routing between nodes is forwarding: the bridge network turns it on too (ensureBase), but routes may come first. */
async function enableForwarding (): Promise<void> {
  const path = '/proc/sys/net/ipv4/ip_forward'
  // Written only when different: a change rewrites the forwarding setting of every interface.
  if ((await readFile(path, 'utf8')).trim() !== '1') await writeFile(path, '1')
}
