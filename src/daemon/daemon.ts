import { readFileSync } from 'node:fs'
import { chmod, mkdir, rm } from 'node:fs/promises'
import { createServer } from 'node:http'
import { Registry } from 'prom-client'
import { dirname, join } from 'node:path'
import type { FastifyInstance } from 'fastify'
import { buildApi } from '../api/server.js'
import type { DaemonInfo } from '../api/system-routes.js'
import type { Config } from '../core/config.js'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import { packageRoot } from '../core/package-paths.js'
import { socketAnswers } from '../core/socket-answers.js'
import { ImageStore } from '../guest/image-store.js'
import { createKernelSource } from '../guest/guest-kernel.js'
import { DHCP_STATE_ROOT, DhcpServer } from '../net/dhcp-server.js'
import { HostNetwork } from '../net/host-network.js'
import { SqliteStore } from '../store/sqlite-store.js'
import { chooseAccel, type AccelChoice } from '../vmm/qemu/accel-probe.js'
import { QemuDriver } from '../vmm/qemu/qemu-driver.js'
import { chooseJail } from '../vmm/qemu/jail.js'
import { PoolManager } from '../pool/pool-manager.js'
import { TemplateManager } from '../snapshot/template-manager.js'
import { Gateway } from '../gateway/gateway.js'
import { ReplicaLauncher } from '../service/replica-launcher.js'
import { ServiceManager } from '../service/service-manager.js'
import { GuestLaunches } from '../vm/guest-launches.js'
import { VmManager, type VmEvent } from '../vm/vm-manager.js'
import { VolumeManager } from '../volume/volume-manager.js'
import { EtcdClusterStore } from '../store/etcd-cluster-store.js'
import { claimNodeSubnet } from '../cluster/node-subnet.js'
import type { ClusterNode } from '../cluster/cluster-node.js'
import type { ServicesApi } from '../service/service-manager.js'
import { DEFAULT_SUBNET } from '../core/config.js'
import { checkClusterConfig, wireClusterNode } from './cluster-wiring.js'

/** QEMU's user-mode networking shows the host to a guest at this address. */
const USER_MODE_HOST = '10.0.2.2'

/** The version in package.json: one source for `uigniter info` and the OpenAPI document. */
export const VERSION = (JSON.parse(readFileSync(join(packageRoot, 'package.json'), 'utf8')) as { version: string }).version

export interface RunningDaemon {
  app: FastifyInstance
  manager: VmManager
  info: DaemonInfo
  /** Stops serving; VMs keep running and are adopted by the next daemon. */
  close: () => Promise<void>
}

/**
 * The composition root: the one place that picks concrete pieces (SQLite,
 * QEMU, the host network) and wires them together, then serves the API on
 * a unix socket and a TCP address.
 */
export async function startDaemon (config: Config, log: Logger): Promise<RunningDaemon> {
  const [host, portText] = splitHostPort(config.api.listen)
  if (!isLoopback(host) && config.api.token === undefined) {
    throw new UigniterError('UIG_ERR_CONFIG_INVALID', `api.listen is ${config.api.listen}, beyond loopback: set api.token (UIGNITER_TOKEN, 16+ characters) so that requests must carry it`)
  }
  if (await socketAnswers(config.api.socket)) {
    throw new UigniterError('UIG_ERR_CONFIG_INVALID', `another daemon already serves ${config.api.socket}`)
  }
  await mkdir(config.dataDir, { recursive: true })
  // A cluster node first joins the store, to learn its VM subnet before the bridge is made with it.
  const inCluster = config.cluster.etcd.length > 0
  if (inCluster) checkClusterConfig(config)
  const clusterStore = inCluster ? new EtcdClusterStore({ endpoints: config.cluster.etcd, leaseTtlS: config.cluster.leaseTtlS, log: log.child({ component: 'etcd' }) }) : undefined
  const subnet = clusterStore === undefined
    ? config.network.subnet
    : await claimNodeSubnet({
      store: clusterStore,
      node: config.cluster.node,
      range: config.cluster.subnetRange,
      ...(config.network.subnet !== DEFAULT_SUBNET ? { wanted: config.network.subnet } : {}),
      dataDir: config.dataDir,
      log: log.child({ component: 'cluster' })
    })
  const store = new SqliteStore(join(config.dataDir, 'uigniter.db'))
  const images = new ImageStore(config.dataDir)
  const accel = await probeAccel(config, log)
  log.info({ accel }, `accelerator: ${accel.accel} (${accel.reason})`)

  let network: HostNetwork | undefined
  let dhcp: DhcpServer | undefined
  let networkInfo: DaemonInfo['network']
  if (config.network.mode === 'bridge' && process.getuid?.() === 0) {
    // One nftables table per bridge, so that two daemons (say, a test's and the host's) never rewrite each other's rules.
    network = new HostNetwork({
      bridge: config.network.bridge,
      subnet,
      ...(inCluster ? { clusterRange: config.cluster.subnetRange } : {}),
      nat: config.network.nat,
      store: store.ipAllocations,
      firewallTable: `uigniter_${config.network.bridge}`,
      logger: log.child({ component: 'net' })
    })
    await network.setup()
    // DHCP for unikernels that take their address from the network. A server that cannot start is
    // logged and retried, but does not stop the daemon: VMs given their address on their command line need none.
    const bridgeNetwork = network
    dhcp = new DhcpServer({
      bridge: config.network.bridge,
      subnet: network.subnet,
      nameservers: async () => await bridgeNetwork.nameservers(),
      // Nodes that share a machine (network namespaces) share /run and a bridge name: one dnsmasq state dir each.
      ...(inCluster ? { stateDir: join(DHCP_STATE_ROOT, `${config.network.bridge}-${config.cluster.node}`) } : {}),
      logger: log.child({ component: 'dhcp' })
    })
    await network.useDhcp(dhcp)
    await dhcp.start().catch((err: unknown) => { log.error({ err }, 'the DHCP server on the bridge did not start; retrying in the background') })
    networkInfo = { mode: 'bridge', bridge: config.network.bridge, subnet }
  } else {
    const reason = config.network.mode === 'user' ? 'network.mode is "user"' : 'not root: taps need root, so VMs use QEMU user-mode networking'
    log.warn(reason)
    networkInfo = { mode: 'user', reason }
  }

  const jail = chooseJail(config.jail, { root: process.getuid?.() === 0, bridge: network !== undefined })
  log.info({ jailed: jail.jail !== undefined }, `QEMU jail: ${jail.reason}`)
  const driver = new QemuDriver({ log: log.child({ component: 'qemu' }), ...(jail.jail !== undefined ? { jail: jail.jail } : {}) })
  const launches = new GuestLaunches(images, accel, network)
  const templates = new TemplateManager({ dataDir: config.dataDir, store, images, driver, launches, network: network !== undefined ? 'bridge' : 'user', log: log.child({ component: 'templates' }) })
  const volumes = new VolumeManager({ dataDir: config.dataDir, store, log: log.child({ component: 'volumes' }), ...(inCluster ? { node: config.cluster.node } : {}) })
  await volumes.recover()
  const manager = new VmManager({ dataDir: config.dataDir, store, images, driver, network, launches, templates, volumes, accel, identityTimeoutMs: config.clones.identityTimeoutMs, log: log.child({ component: 'vms' }) })
  manager.on('vm', (event: VmEvent) => { volumes.vmChanged(event.vm) })
  const recovered = await manager.recover()
  log.info(recovered, 'recovered VMs from the previous daemon')
  const interrupted = await templates.recover()
  if (interrupted > 0) log.warn({ interrupted }, 'removed templates whose making was interrupted')
  const pools = new PoolManager(manager, store, log.child({ component: 'pools' }))
  pools.restore()

  const metrics = new Registry()
  const gateway = new Gateway({
    address: config.gateway.address,
    httpPort: config.gateway.httpPort,
    log: log.child({ component: 'gateway' }),
    metrics,
    // Only configured services wake, and services are configured by the manager below (or the cluster's leader).
    wake: (service) => {
      if (cluster !== undefined) cluster.services.wake(service)
      else local?.wake(service)
    }
  })
  await gateway.listen().catch((err: unknown) => {
    throw new UigniterError('UIG_ERR_CONFIG_INVALID', `the service gateway cannot listen on ${config.gateway.address}:${config.gateway.httpPort} (${(err as Error).message}); set gateway.httpPort (UIGNITER_GATEWAY_HTTP_PORT) to a free port`, { cause: err })
  })
  // Guests reach the host on the bridge's gateway address, or on QEMU's user-mode host address.
  const gatewayHost = network !== undefined ? network.subnet.gateway : USER_MODE_HOST
  const launcher = new ReplicaLauncher({
    vms: manager,
    pools,
    templates,
    volumes,
    gatewayEnv: { UIGNITER_GATEWAY_HOST: gatewayHost, UIGNITER_GATEWAY_HTTP_PORT: String(gateway.httpPort) },
    log: log.child({ component: 'services' })
  })
  // One host: its own service controllers. A cluster node: the leader's, wherever it runs; this node's agent runs what it is given.
  let local: ServiceManager | undefined
  let cluster: ClusterNode | undefined
  let clusterApi: NonNullable<Parameters<typeof buildApi>[0]['cluster']> | undefined
  if (clusterStore === undefined) {
    local = new ServiceManager({
      vms: manager,
      store,
      launcher,
      gateway,
      gatewayHttpPort: gateway.httpPort,
      allowGatewayPorts: async (ports) => { await network?.allowHostPorts(ports) },
      log: log.child({ component: 'services' })
    })
    await local.restore()
  } else {
    const wired = wireClusterNode({ config, store: clusterStore, subnet, accel: accel.accel === 'kvm' ? 'kvm' : 'tcg', version: VERSION, manager, images, templates, launcher, volumes, gateway, network, log })
    cluster = wired.node
    await network?.allowHostPorts([gateway.httpPort])
    await cluster.start()
    clusterApi = { node: cluster, blobs: images, placeVm: wired.placeVm }
    log.info({ node: config.cluster.node, subnet }, 'joined the cluster')
  }
  const services: ServicesApi = local ?? (cluster as ClusterNode).services

  const info: DaemonInfo = {
    version: VERSION,
    accel,
    network: networkInfo,
    api: { socket: config.api.socket, listen: config.api.listen },
    gateway: { address: config.gateway.address, httpPort: gateway.httpPort, guestAddress: gatewayHost },
    dataDir: config.dataDir,
    startedAt: new Date().toISOString(),
    recovered
  }
  const app = await buildApi({ manager, pools, templates, services, volumes, images, info, log, metrics, token: config.api.token, ...(clusterApi !== undefined ? { cluster: clusterApi } : {}) })
  await mkdir(dirname(config.api.socket), { recursive: true })
  await rm(config.api.socket, { force: true })
  await app.listen({ path: config.api.socket })
  await chmod(config.api.socket, 0o660)
  // fastify listens once; the TCP address is a second server in front of the same router.
  const tcp = createServer((req, res) => { app.routing(req, res) })
  await new Promise<void>((resolve, reject) => {
    tcp.once('error', (err) => reject(new UigniterError('UIG_ERR_CONFIG_INVALID', `cannot listen on ${config.api.listen}: ${err.message}`, { cause: err })))
    tcp.listen(Number(portText), host, resolve)
  })
  log.info({ socket: config.api.socket, listen: config.api.listen }, 'serving the API')

  return {
    app,
    manager,
    info,
    close: async () => {
      tcp.closeAllConnections()
      await new Promise((resolve) => tcp.close(resolve))
      await app.close()
      local?.close()
      await cluster?.close()
      await gateway.close()
      pools.close()
      await manager.close()
      await dhcp?.close()
      store.close()
    }
  }
}

async function probeAccel (config: Config, log: Logger): Promise<AccelChoice> {
  const kernel = await createKernelSource(config).find()
  if (kernel === undefined) {
    if (config.accel !== 'auto') return { accel: config.accel, reason: `accel "${config.accel}" is set in the configuration` }
    log.warn('no guest kernel to probe KVM with; using TCG until "uigniter kernel build" has run')
    return { accel: 'tcg', reason: 'no guest kernel was built yet to probe KVM with' }
  }
  return await chooseAccel(config, kernel.path, kernel.key)
}

function splitHostPort (listen: string): [string, string] {
  const m = /^\[?([^\]]+?)\]?:(\d{1,5})$/.exec(listen)
  if (m === null || Number(m[2]) > 65535) throw new UigniterError('UIG_ERR_CONFIG_INVALID', `api.listen must be host:port, not "${listen}"`)
  return [m[1] ?? '', m[2] ?? '']
}

function isLoopback (host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.')
}
