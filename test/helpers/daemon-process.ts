import { spawn, type ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { join } from 'node:path'
import { ApiClient } from '../../src/cli/api-client.js'
import { run } from '../../src/core/exec.js'
import { loadConfig } from '../../src/core/config.js'
import type { PoolStatus } from '../../src/core/pool.js'
import type { Vm } from '../../src/core/vm.js'
import { socketAnswers } from '../../src/core/socket-answers.js'
import { freePort } from '../../src/core/free-port.js'
import { packageRoot } from './fixtures.js'

/**
 * A real `uigniter daemon` process for tests: its own data dir, socket,
 * port, bridge and subnet, so that tests never touch the machine's daemon.
 */
export class DaemonProcess {
  readonly env: NodeJS.ProcessEnv
  readonly api: ApiClient
  #child: ChildProcess | undefined
  output = ''

  constructor (dataDir: string, overrides: NodeJS.ProcessEnv, apiPort: number, gatewayPort: number) {
    const suffix = randomBytes(3).toString('hex')
    this.env = {
      ...process.env,
      UIGNITER_DATA_DIR: dataDir,
      UIGNITER_SOCKET: join(dataDir, 'uigniter.sock'),
      UIGNITER_API_LISTEN: `127.0.0.1:${apiPort}`,
      UIGNITER_BRIDGE: `uigd${suffix}`,
      UIGNITER_GATEWAY_HTTP_PORT: String(gatewayPort),
      UIGNITER_LOG_LEVEL: 'info',
      ...overrides
    }
    this.api = new ApiClient(loadConfig(this.env), this.env)
  }

  static async create (dataDir: string, overrides: NodeJS.ProcessEnv = {}): Promise<DaemonProcess> {
    return new DaemonProcess(dataDir, overrides, await freePort(), await freePort())
  }

  /** The service gateway's HTTP port on the host. */
  get gatewayPort (): number {
    return Number(this.env.UIGNITER_GATEWAY_HTTP_PORT)
  }

  get pid (): number | undefined {
    return this.#child?.pid
  }

  /** Starts the daemon and waits until it answers on its socket. */
  async start (timeoutMs = 60_000): Promise<void> {
    const child = spawn(process.execPath, [join(packageRoot, 'dist/src/daemon/main.js'), 'daemon'], { env: this.env, stdio: ['ignore', 'pipe', 'pipe'] })
    this.#child = child
    child.stdout?.on('data', (c: Buffer) => { this.output += c.toString() })
    child.stderr?.on('data', (c: Buffer) => { this.output += c.toString() })
    const deadline = Date.now() + timeoutMs
    while (Date.now() < deadline) {
      if (await socketAnswers(this.env.UIGNITER_SOCKET ?? '')) return
      if (child.exitCode !== null) break
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
    throw new Error(`the daemon did not start:\n${this.output.slice(-3000)}`)
  }

  /** The VM once it is in one of `states`; throws with the state it is in after `timeoutMs`. */
  async waitForVm (id: string, states: string[], timeoutMs = 60_000): Promise<Vm> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const vm = await this.api.call<Vm>('GET', `/v1/vms/${id}`)
      if (states.includes(vm.state)) return vm
      if (Date.now() > deadline) throw new Error(`VM ${id} is ${vm.state}, expected ${states.join('|')}`)
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }

  /** SIGTERM and wait: VMs keep running. */
  async stop (): Promise<void> {
    await this.#signal('SIGTERM')
  }

  /**
   * Deletes what the daemon holds (services, pools, VMs, templates, in that order: each
   * depends on the next), stops it and removes its network. For `after` hooks.
   */
  async removeEverything (): Promise<void> {
    for (const service of await this.api.call<Array<{ spec: { name: string } }>>('GET', '/v1/services').catch(() => [])) {
      await this.api.call('DELETE', `/v1/services/${service.spec.name}`).catch(() => {})
    }
    for (const pool of await this.api.call<Array<{ spec: { name: string } }>>('GET', '/v1/pools').catch(() => [])) {
      await this.api.call('DELETE', `/v1/pools/${pool.spec.name}`).catch(() => {})
    }
    for (const vm of await this.api.call<Array<{ id: string }>>('GET', '/v1/vms?all=true').catch(() => [])) {
      await this.api.call('DELETE', `/v1/vms/${vm.id}?force=true`).catch(() => {})
    }
    for (const template of await this.api.call<Array<{ name: string }>>('GET', '/v1/templates').catch(() => [])) {
      await this.api.call('DELETE', `/v1/templates/${template.name}`).catch(() => {})
    }
    await this.stop()
    await this.removeNetwork()
  }

  /** Polls a pool until `check` holds; throws with its last state after `timeoutMs`. */
  async waitForPool (name: string, check: (p: PoolStatus) => boolean, timeoutMs = 60_000): Promise<PoolStatus> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const pool = await this.api.call<PoolStatus>('GET', `/v1/pools/${name}`)
      if (check(pool)) return pool
      if (Date.now() > deadline) throw new Error(`pool ${name} never got there: ${JSON.stringify(pool)}`)
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }

  /** Removes the bridge and firewall table this daemon made (tests only; a real host keeps them). */
  async removeNetwork (): Promise<void> {
    const bridge = this.env.UIGNITER_BRIDGE ?? ''
    await run('ip', ['link', 'del', bridge]).catch(() => {})
    await run('nft', ['delete', 'table', 'ip', `uigniter_${bridge}`]).catch(() => {})
  }

  /** kill -9, as a crash would. */
  async crash (): Promise<void> {
    await this.#signal('SIGKILL')
  }

  async #signal (signal: NodeJS.Signals): Promise<void> {
    const child = this.#child
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) return
    const closed = new Promise((resolve) => child.once('close', resolve))
    child.kill(signal)
    await closed
  }
}
