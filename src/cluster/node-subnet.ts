import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { UigniterError } from '../core/errors.js'
import { writeFileAtomic } from '../core/fs-atomic.js'
import type { Logger } from '../core/logger.js'
import type { ClusterStore } from '../core/ports/cluster-store.js'
import { keys } from './cluster-keys.js'

const NODE_PREFIX = 24

function toInt (ip: string): number {
  const parts = ip.split('.').map(Number)
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) throw new Error(`"${ip}" is not an IPv4 address`)
  return (((parts[0] ?? 0) << 24) >>> 0) + ((parts[1] ?? 0) << 16) + ((parts[2] ?? 0) << 8) + (parts[3] ?? 0)
}

const toIp = (n: number): string => [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.')

function parseCidr (cidr: string, what: string): { base: number, prefix: number } {
  const m = /^(\d+\.\d+\.\d+\.\d+)\/(\d{1,2})$/.exec(cidr)
  const prefix = Number(m?.[2])
  if (m === null || prefix > 32) throw new UigniterError('UIG_ERR_CONFIG_INVALID', `${what} "${cidr}" is not an IPv4 CIDR`)
  const mask = prefix === 0 ? 0 : (~0 << (32 - prefix)) >>> 0
  return { base: (toInt(m[1] ?? '') & mask) >>> 0, prefix }
}

/**
 * This node's VM subnet, a /24 out of the cluster range: the one it had
 * (the store remembers it by node, and so does the data dir, for a start
 * while etcd is out of reach), the one it asks for, or the first free one.
 * A claim is a create-if-absent transaction, so two joining nodes never
 * take the same subnet.
 */
export async function claimNodeSubnet (options: { store: ClusterStore, node: string, range: string, wanted?: string, dataDir: string, log: Logger }): Promise<string> {
  const { store, node, range, wanted, dataDir, log } = options
  const remembered = join(dataDir, 'cluster-subnet')
  const cluster = parseCidr(range, 'cluster.subnetRange')
  if (cluster.prefix > NODE_PREFIX) throw new UigniterError('UIG_ERR_CONFIG_INVALID', `cluster.subnetRange ${range} is smaller than one node's /${NODE_PREFIX}`)
  let claims: Array<{ cidr: string, node: string }>
  try {
    claims = (await store.list(keys.subnets)).items.map((kv) => ({ cidr: kv.key.slice(keys.subnets.length).replace('-', '/'), node: kv.value }))
  } catch (err) {
    const saved = await readFile(remembered, 'utf8').then((t) => t.trim(), () => undefined)
    if (saved === undefined) throw err
    log.warn({ subnet: saved }, 'the cluster store is out of reach; using the subnet this node had')
    return saved
  }
  const mine = claims.find((c) => c.node === node)
  if (mine !== undefined && (wanted === undefined || wanted === mine.cidr)) {
    await writeFileAtomic(remembered, mine.cidr + '\n')
    return mine.cidr
  }
  const candidates: string[] = []
  if (wanted !== undefined) {
    const w = parseCidr(wanted, 'network.subnet')
    const mask = cluster.prefix === 0 ? 0 : (~0 << (32 - cluster.prefix)) >>> 0
    if (((w.base & mask) >>> 0) !== cluster.base || w.prefix < cluster.prefix) throw new UigniterError('UIG_ERR_CONFIG_INVALID', `network.subnet ${wanted} is not inside cluster.subnetRange ${range}`)
    candidates.push(`${toIp(w.base)}/${w.prefix}`)
  } else {
    const count = 2 ** (NODE_PREFIX - cluster.prefix)
    for (let i = 0; i < count; i++) candidates.push(`${toIp(cluster.base + i * 256)}/${NODE_PREFIX}`)
  }
  const taken = new Map(claims.map((c) => [c.cidr, c.node]))
  for (const cidr of candidates) {
    const owner = taken.get(cidr)
    if (owner !== undefined) {
      if (wanted !== undefined) throw new UigniterError('UIG_ERR_NET_SUBNET_CONFLICT', `subnet ${cidr} belongs to node ${owner} of the cluster; give this node another one, or none (it takes a free one)`)
      continue
    }
    const { succeeded } = await store.txn([
      { put: keys.subnet(cidr), value: node },
      ...(mine !== undefined ? [{ delete: keys.subnet(mine.cidr) }] : [])
    ], [{ key: keys.subnet(cidr), createRevision: 0 }])
    if (succeeded) {
      await writeFileAtomic(remembered, cidr + '\n')
      log.info({ subnet: cidr }, 'this node took its VM subnet from the cluster range')
      return cidr
    }
  }
  throw new UigniterError('UIG_ERR_CLUSTER_SUBNET_EXHAUSTED', `every /${NODE_PREFIX} of ${range} is taken by a node`)
}
