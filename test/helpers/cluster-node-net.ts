import { createServer, type Server } from 'node:net'
import { UigniterError } from '../../src/core/errors.js'
import { createLogger } from '../../src/core/logger.js'
import { ClusterRoutes, type RoutePeer } from '../../src/net/cluster-routes.js'
import { HostNetwork } from '../../src/net/host-network.js'
import { InMemoryIpAllocationStore } from '../net/in-memory-ip-allocation-store.js'

/**
 * Run inside a cluster lab node's namespace (`lab.spawn(i, process.execPath,
 * [this file, JSON])`): the network side of a node, as its daemon would set
 * it up, without a daemon.
 *
 * - `{ "mode": "host", bridge, subnet, clusterRange?, nat, allowedHostPorts, peers, listen }`:
 *   the bridge and firewall (HostNetwork), routes to the peers
 *   (ClusterRoutes), and TCP listeners on host addresses that answer
 *   "host ADDRESS:PORT from CLIENT"; prints "ready", runs until SIGTERM,
 *   then removes the bridge and firewall (the routes stay: they are the
 *   routes' own test).
 * - `{ "mode": "routes", subnet, peers }`: one ClusterRoutes.sync(peers) in a
 *   fresh process (a daemon's restart), then prints the outcome as JSON.
 */
interface HostConfig {
  mode: 'host'
  bridge: string
  subnet: string
  clusterRange?: string
  nat: boolean
  allowedHostPorts: number[]
  peers: RoutePeer[]
  listen: Array<{ address: string, port: number }>
}

interface RoutesConfig { mode: 'routes', subnet: string, peers: RoutePeer[] }

const logger = createLogger('info')

async function host (config: HostConfig): Promise<void> {
  const network = new HostNetwork({
    bridge: config.bridge,
    subnet: config.subnet,
    nat: config.nat,
    store: new InMemoryIpAllocationStore(),
    allowedHostPorts: config.allowedHostPorts,
    firewallTable: 'uigniter',
    logger,
    ...(config.clusterRange === undefined ? {} : { clusterRange: config.clusterRange })
  })
  await network.setup()
  await network.setClusterNodes(config.peers.map((p) => p.via))
  await new ClusterRoutes({ ownSubnet: config.subnet, logger }).sync(config.peers)
  const servers: Server[] = []
  for (const { address, port } of config.listen) {
    const server = createServer((socket) => socket.end(`host ${address}:${port} from ${socket.remoteAddress ?? '?'}`))
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(port, address, resolve)
    })
    servers.push(server)
  }
  process.stdout.write('ready\n')
  await new Promise<void>((resolve) => process.once('SIGTERM', () => resolve()))
  for (const server of servers) server.close()
  await network.teardown()
}

async function routes (config: RoutesConfig): Promise<void> {
  try {
    await new ClusterRoutes({ ownSubnet: config.subnet, logger }).sync(config.peers)
    process.stdout.write(JSON.stringify({ ok: true }) + '\n')
  } catch (err) {
    const code = err instanceof UigniterError ? err.code : undefined
    process.stdout.write(JSON.stringify({ ok: false, code, message: (err as Error).message }) + '\n')
  }
}

const config = JSON.parse(process.argv[2] ?? '{}') as HostConfig | RoutesConfig
await (config.mode === 'host' ? host(config) : routes(config))
