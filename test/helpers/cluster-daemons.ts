import { createHash, randomBytes } from 'node:crypto'
import { readdir, rm, writeFile } from 'node:fs/promises'
import { defaultMemoryDir } from '../../src/snapshot/template.js'
import { join } from 'node:path'
import { ApiClient } from '../../src/cli/api-client.js'
import { loadConfig } from '../../src/core/config.js'
import type { ClusterLab, LabNode } from './cluster-lab.js'
import { packageRoot } from './fixtures.js'

/**
 * Real uigniter daemons on a cluster lab's nodes, one per network
 * namespace, each with its own data dir, socket, bridge, nft table and
 * subnet, joined through the lab's three etcd members.
 */
export class ClusterDaemons {
  readonly token = randomBytes(16).toString('hex')
  readonly #lab: ClusterLab
  readonly #procs = new Map<number, ReturnType<ClusterLab['spawn']>>()
  readonly #extraEnv: (i: number) => NodeJS.ProcessEnv

  constructor (lab: ClusterLab, extraEnv: (i: number) => NodeJS.ProcessEnv = () => ({})) {
    this.#lab = lab
    this.#extraEnv = extraEnv
  }

  env (i: number): NodeJS.ProcessEnv {
    const n = this.#lab.node(i)
    return {
      ...process.env,
      UIGNITER_CONFIG: join(n.dataDir, 'config.json'),
      UIGNITER_ETCD: this.#lab.etcdEndpoints.join(','),
      UIGNITER_NODE: n.name,
      UIGNITER_NODE_ADDRESS: n.underlay,
      UIGNITER_SUBNET: n.subnet,
      UIGNITER_DATA_DIR: n.dataDir,
      UIGNITER_SOCKET: n.socket,
      UIGNITER_API_LISTEN: `${n.underlay}:7377`,
      UIGNITER_TOKEN: this.token,
      UIGNITER_ACCEL: 'tcg',
      UIGNITER_LOG_LEVEL: 'info',
      ...this.#extraEnv(i)
    }
  }

  /** An API client for node i, over its TCP address with the cluster's token. */
  api (i: number): ApiClient {
    const env = { ...this.env(i), UIGNITER_HOST: this.#lab.node(i).apiUrl }
    return new ApiClient(loadConfig(env), env)
  }

  node (i: number): LabNode { return this.#lab.node(i) }

  /** Starts node i's daemon (its config file first: a uid range and a short lease of its own) and waits for its API. */
  async start (i: number, timeoutMs = 90_000): Promise<void> {
    const n = this.#lab.node(i)
    // Each node its own jail uids (by the lab's name, so that two labs at once never share one): the daemons share one kernel.
    const uidBase = 700_000 + (createHash('sha256').update(this.#lab.name).digest().readUInt16BE(0) % 200) * 10_000 + i * 2000
    await writeFile(join(n.dataDir, 'config.json'), JSON.stringify({ jail: { uidBase, uidCount: 1000, gid: 640_000 }, cluster: { leaseTtlS: 4, subnetRange: this.#lab.clusterRange } }))
    const proc = this.#lab.spawn(i, process.execPath, [join(packageRoot, 'dist/src/daemon/main.js'), 'daemon'], { env: this.env(i), log: `daemon-${n.name}.log` })
    this.#procs.set(i, proc)
    const deadline = Date.now() + timeoutMs
    const api = this.api(i)
    while (Date.now() < deadline) {
      if (proc.exitCode !== null) throw new Error(`node ${n.name}'s daemon exited with ${proc.exitCode}; its log: ${proc.logPath}`)
      if (await api.call('GET', '/healthz').then(() => true, () => false)) return
      await new Promise((resolve) => setTimeout(resolve, 200))
    }
    throw new Error(`node ${n.name}'s daemon did not answer within ${timeoutMs} ms; its log: ${proc.logPath}`)
  }

  /**
   * Node i's daemon running again, whatever a scenario did to it (killed,
   * stopped): a scenario that fails halfway must not leave the next ones a
   * node short.
   */
  async ensureRunning (i: number): Promise<void> {
    const proc = this.#procs.get(i)
    if (proc?.pid !== undefined && proc.exitCode === null && proc.signalCode === null) {
      process.kill(proc.pid, 'SIGCONT')
      return
    }
    await this.start(i)
  }

  pid (i: number): number | undefined { return this.#procs.get(i)?.pid }
  logPath (i: number): string | undefined { return this.#procs.get(i)?.logPath }

  /** kill -9 of the daemon alone: its VMs go on running. */
  kill (i: number, signal: NodeJS.Signals = 'SIGKILL'): void {
    const proc = this.#procs.get(i)
    if (proc?.pid !== undefined && proc.exitCode === null) process.kill(proc.pid, signal)
  }

  /**
   * Stops every daemon it started (SIGTERM; VMs stay for the lab to kill),
   * then removes the RAM files of the templates the nodes made: they live in
   * /dev/shm, outside the lab's directory, and would outlive it.
   */
  async stopAll (): Promise<void> {
    await this.#stopDaemons()
    for (const n of this.#lab.nodes) {
      const ids = await readdir(join(n.dataDir, 'templates')).catch(() => [])
      for (const id of ids) await rm(await defaultMemoryDir(n.dataDir, id), { recursive: true, force: true })
    }
  }

  async #stopDaemons (): Promise<void> {
    await Promise.all([...this.#procs.values()].map(async (p) => {
      if (p.exitCode !== null || p.pid === undefined) return
      const exited = new Promise((resolve) => p.once('exit', resolve))
      p.kill('SIGTERM')
      await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 5000))])
      if (p.exitCode === null) p.kill('SIGKILL')
    }))
  }
}
