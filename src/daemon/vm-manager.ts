import { randomBytes } from 'node:crypto'
import { EventEmitter } from 'node:events'
import { freemem, cpus, totalmem } from 'node:os'
import { join } from 'node:path'
import type { Config } from '../core/config.js'
import { UigniterError } from '../core/errors.js'
import { formatImageRef, type ImageManifest } from '../core/image.js'
import type { Logger } from '../core/logger.js'
import type { Vm, VmCreateRequest, VmExit, VmState } from '../core/vm.js'
import type { ImageStore } from '../guest/image-store.js'
import type { HostNetwork } from '../net/host-network.js'
import type { SqliteStore, VmFilter } from '../store/sqlite-store.js'
import type { AccelChoice } from '../vmm/qemu/accel-probe.js'
import { USER_NETWORK } from '../vmm/qemu/command-line.js'
import type { GuestLaunch, QemuDriver } from '../vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../vmm/qemu/qemu-vm.js'
import { freePort } from '../vmm/qemu/image-boot.js'

export interface VmEvent { type: 'vm.state', vm: Vm }

export interface VmManagerDeps {
  config: Config
  store: SqliteStore
  images: ImageStore
  driver: QemuDriver
  /** Undefined when the host cannot make taps (not root): VMs then use user-mode networking. */
  network: HostNetwork | undefined
  accel: AccelChoice
  log: Logger
}

const LIVE: VmState[] = ['starting', 'running', 'paused', 'stopping']

/**
 * The VM lifecycle: it turns a create request into a running VM (image →
 * network → QEMU), records every state change in the store, and reacts to
 * QEMU processes ending. It is the only writer of VM records. Events
 * ('vm' → VmEvent) feed the API's server-sent events and metrics.
 */
export class VmManager extends EventEmitter {
  readonly #deps: VmManagerDeps
  readonly #running = new Map<string, QemuVm>()
  /** Settles once a VM's end is recorded and its network released. */
  readonly #finished = new Map<string, Promise<void>>()

  constructor (deps: VmManagerDeps) {
    super()
    this.#deps = deps
  }

  /**
   * After a daemon (re)start: adopt every VM the store says is live from its
   * state directory, mark the ones that died meanwhile, and remove network
   * leftovers (taps, rules, addresses) that no live VM owns.
   */
  async recover (): Promise<{ adopted: number, died: number }> {
    let adopted = 0
    let died = 0
    for (const vm of this.#deps.store.listVms({ state: LIVE })) {
      let found: Awaited<ReturnType<QemuDriver['adopt']>>
      try {
        found = await this.#deps.driver.adopt(vm.stateDir)
      } catch (err) {
        // A crash in the middle of a create can leave a state dir without its launch record:
        // such a VM never ran, and must not keep the daemon from starting.
        died++
        this.#deps.log.warn({ err, vm: vm.id }, 'a VM\'s state directory cannot be adopted')
        this.#finish(vm, { reason: 'died-while-daemon-down', detail: `its state directory could not be read: ${(err as Error).message}`, at: new Date().toISOString() })
        continue
      }
      if ('dead' in found) {
        died++
        this.#finish(vm, { ...found.exit, reason: found.exit.reason === 'app-exited' || found.exit.reason === 'exec-failed' ? found.exit.reason : 'died-while-daemon-down' })
        continue
      }
      adopted++
      this.#watch(vm.id, found)
    }
    const live = this.#deps.store.listVms({ state: LIVE })
    for (const ip of this.#deps.store.ipAllocations.list()) {
      if (!live.some((vm) => vm.id === ip.owner)) this.#deps.store.ipAllocations.release(ip.ip)
    }
    if (this.#deps.network !== undefined) {
      await this.#deps.network.cleanupOrphans(live.map((vm) => vm.id))
      for (const vm of live) if (vm.network === 'bridge' && vm.publish.length > 0) await this.#deps.network.publish(vm.id, vm.publish)
    }
    return { adopted, died }
  }

  /** Throws UIG_ERR_IMAGE_NOT_FOUND unless the image exists. */
  async checkImage (ref: string): Promise<void> {
    await this.#deps.images.get(ref)
  }

  /**
   * Creates and starts a VM; resolves once QEMU runs (not when the app
   * answers). `startPaused` leaves its vCPUs stopped before the first
   * instruction (a prespawned pool instance); `pool` marks its pool.
   */
  async create (request: VmCreateRequest, internal: { pool?: string, startPaused?: boolean } = {}): Promise<Vm> {
    const manifest = await this.#deps.images.get(request.image)
    const vcpus = request.vcpus ?? manifest.vcpus
    const memoryMiB = request.memoryMiB ?? manifest.memoryMiB
    checkResources(vcpus, memoryMiB)
    const id = randomBytes(8).toString('hex')
    const network = request.network === 'bridge' && this.#deps.network === undefined ? 'user' : request.network
    const vm: Vm = {
      id,
      name: request.name ?? `${manifest.name.split('/').pop() ?? 'vm'}-${id.slice(0, 6)}`,
      image: formatImageRef(manifest),
      imageDigest: manifest.digest,
      state: 'starting',
      vcpus,
      memoryMiB,
      network,
      ipAddress: null,
      macAddress: null,
      tap: null,
      publish: request.publish,
      pid: null,
      accel: this.#deps.accel.accel,
      stateDir: join(this.#deps.config.dataDir, 'vms', id),
      createdAt: new Date().toISOString(),
      startedAt: null,
      exit: null,
      pool: internal.pool !== undefined ? { name: internal.pool, claimed: false } : null
    }
    this.#deps.store.insertVm(vm)
    this.#emit(vm)
    try {
      const launch = { ...await this.#launchSpec(vm, manifest, request), ...(internal.startPaused === true ? { startPaused: true } : {}) }
      const qemu = await this.#deps.driver.start({ id, stateDir: vm.stateDir, launch, ...(request.cpuAffinity !== undefined ? { cpuAffinity: request.cpuAffinity } : {}) })
      vm.pid = qemu.pid
      vm.state = internal.startPaused === true ? 'paused' : 'running'
      vm.startedAt = new Date().toISOString()
      this.#deps.store.updateVm(vm)
      if (network === 'bridge' && vm.publish.length > 0) await this.#deps.network?.publish(id, vm.publish)
      this.#watch(id, qemu)
      this.#emit(vm)
      return vm
    } catch (err) {
      await this.#releaseNetwork(vm)
      this.#finish(vm, { reason: 'boot-failed', detail: (err as Error).message, at: new Date().toISOString() }, 'failed')
      throw err
    }
  }

  async #launchSpec (vm: Vm, manifest: ImageManifest, request: VmCreateRequest): Promise<GuestLaunch> {
    const { images } = this.#deps
    const base = {
      manifest,
      kernelPath: images.blobPath(manifest.kernel.blob.digest),
      rootfsPath: manifest.rootfs !== undefined ? images.blobPath(manifest.rootfs.digest) : undefined,
      accel: this.#deps.accel.accel,
      vcpus: vm.vcpus,
      memoryMiB: vm.memoryMiB,
      hostname: vm.name,
      appArgs: request.args,
      appEnv: request.env,
      shares: request.shares,
      ...(request.overlaySizeMiB !== undefined ? { overlaySizeMiB: request.overlaySizeMiB } : {})
    }
    if (vm.network === 'bridge' && this.#deps.network !== undefined) {
      const attached = await this.#deps.network.attach(vm.id)
      vm.ipAddress = attached.ip
      vm.macAddress = attached.mac
      vm.tap = attached.tap
      this.#deps.store.updateVm(vm)
      return {
        ...base,
        network: { mode: 'tap', tap: attached.tap, mac: attached.mac },
        guestNetwork: { address: attached.ip, prefix: attached.prefix, gateway: attached.gateway, dns: attached.dns }
      }
    }
    if (vm.network === 'user') {
      const forwards = []
      for (const p of vm.publish) forwards.push({ hostAddress: p.hostAddress, hostPort: p.hostPort === 0 ? await freePort() : p.hostPort, guestPort: p.guestPort })
      vm.ipAddress = USER_NETWORK.address
      return { ...base, network: { mode: 'user', forwards }, guestNetwork: USER_NETWORK }
    }
    return { ...base, network: { mode: 'none' } }
  }

  /** Follows a QEMU process to its end and records how it ended. */
  #watch (id: string, qemu: QemuVm): void {
    this.#running.set(id, qemu)
    const finished = qemu.exited.then(async (exit) => {
      const vm = this.#deps.store.findVm(id)
      if (vm !== undefined) {
        await this.#releaseNetwork(vm)
        this.#finish(vm, exit)
      }
      this.#running.delete(id)
      this.#finished.delete(id)
    }).catch((err: unknown) => { this.#deps.log.error({ err, vm: id }, 'watching the VM failed') })
    this.#finished.set(id, finished)
  }

  #finish (vm: Vm, exit: VmExit, state: VmState = 'exited'): void {
    vm.state = state
    vm.exit = exit
    vm.pid = null
    // The tap is gone and the address back in the pool; ipAddress stays as a record of where it ran.
    vm.tap = null
    this.#deps.store.updateVm(vm)
    this.#deps.store.ipAllocations.releaseOwner(vm.id)
    this.#deps.log.info({ vm: vm.id, name: vm.name, exit }, 'VM ended')
    this.#emit(vm)
  }

  async #releaseNetwork (vm: Vm): Promise<void> {
    if (vm.network !== 'bridge' || this.#deps.network === undefined) return
    try {
      await this.#deps.network.detach(vm.id)
    } catch (err) {
      this.#deps.log.warn({ err, vm: vm.id }, 'releasing the VM\'s network failed')
    }
  }

  get (idOrName: string): Vm {
    const vm = this.#deps.store.findVm(idOrName)
    if (vm === undefined) throw new UigniterError('UIG_ERR_VM_NOT_FOUND', `no VM has the id or name "${idOrName}"; "uigniter ps -a" lists them`)
    return vm
  }

  list (filter: VmFilter = {}): Vm[] {
    return this.#deps.store.listVms(filter)
  }

  /** Graceful stop; a VM that already ended is returned as it is (idempotent). */
  async stop (idOrName: string, graceMs = 10_000): Promise<Vm> {
    const vm = this.get(idOrName)
    const qemu = this.#running.get(vm.id)
    if (qemu === undefined) return vm
    if (vm.state !== 'stopping') {
      vm.state = 'stopping'
      this.#deps.store.updateVm(vm)
      this.#emit(vm)
    }
    await qemu.stop({ graceMs })
    await this.#finished.get(vm.id)
    return this.get(vm.id)
  }

  /** SIGKILL, at once; idempotent like stop. */
  async kill (idOrName: string): Promise<Vm> {
    const vm = this.get(idOrName)
    const qemu = this.#running.get(vm.id)
    if (qemu === undefined) return vm
    qemu.kill()
    await this.#finished.get(vm.id)
    return this.get(vm.id)
  }

  async pause (idOrName: string): Promise<Vm> {
    return await this.#setPaused(idOrName, true)
  }

  async resume (idOrName: string): Promise<Vm> {
    return await this.#setPaused(idOrName, false)
  }

  async #setPaused (idOrName: string, paused: boolean): Promise<Vm> {
    const vm = this.get(idOrName)
    const qemu = this.#running.get(vm.id)
    const from: VmState = paused ? 'running' : 'paused'
    if (vm.state === (paused ? 'paused' : 'running')) return vm
    if (qemu === undefined || vm.state !== from) {
      throw new UigniterError('UIG_ERR_VM_INVALID_STATE', `VM ${vm.name} is ${vm.state}; only a ${from} VM can be ${paused ? 'paused' : 'resumed'}`)
    }
    if (paused) await qemu.pause()
    else await qemu.resume()
    vm.state = paused ? 'paused' : 'running'
    this.#deps.store.updateVm(vm)
    this.#emit(vm)
    return vm
  }

  /** Records that a pool handed this VM out. */
  markClaimed (id: string): Vm {
    const vm = this.get(id)
    if (vm.pool !== null) {
      vm.pool = { ...vm.pool, claimed: true }
      this.#deps.store.updateVm(vm)
      this.#emit(vm)
    }
    return vm
  }

  /** Deletes a VM and its state directory; a live VM needs `force` (then it is killed first). */
  async remove (idOrName: string, force = false): Promise<Vm> {
    let vm = this.get(idOrName)
    if (this.#running.has(vm.id) || LIVE.includes(vm.state)) {
      if (!force) throw new UigniterError('UIG_ERR_VM_INVALID_STATE', `VM ${vm.name} is ${vm.state}; stop it first, or remove it with force (rm -f)`)
      vm = await this.kill(vm.id)
    }
    await this.#deps.driver.remove(vm.stateDir)
    this.#deps.store.deleteVm(vm.id)
    this.emit('vm', { type: 'vm.state', vm: { ...vm, state: 'exited' } } satisfies VmEvent)
    return vm
  }

  /** The last `tailBytes` of the console log. */
  async logs (idOrName: string, tailBytes = 64 * 1024): Promise<string> {
    const vm = this.get(idOrName)
    return await this.#deps.driver.readConsole(vm.stateDir, { tailBytes })
  }

  /** Calls `onData` with new console output until the returned function is called or the VM ends. */
  followLogs (idOrName: string, onData: (chunk: string) => void): () => void {
    const vm = this.get(idOrName)
    return this.#deps.driver.followConsole(vm.stateDir, onData)
  }

  /** Stops watching without stopping VMs: they outlive the daemon. */
  close (): void {
    for (const qemu of this.#running.values()) qemu.close()
    this.#running.clear()
  }

  #emit (vm: Vm): void {
    this.emit('vm', { type: 'vm.state', vm: { ...vm } } satisfies VmEvent)
  }
}

/** More vCPUs or memory than the host has can never start: say so before QEMU does. */
function checkResources (vcpus: number, memoryMiB: number): void {
  const hostCpus = cpus().length
  const hostMiB = Math.floor(totalmem() / 1048576)
  if (vcpus > hostCpus) {
    throw new UigniterError('UIG_ERR_VM_RESOURCES', `${vcpus} vCPUs asked, but the host has ${hostCpus} CPUs`)
  }
  if (memoryMiB > hostMiB) {
    throw new UigniterError('UIG_ERR_VM_RESOURCES', `${memoryMiB} MiB of memory asked, but the host has ${hostMiB} MiB in all (${Math.floor(freemem() / 1048576)} MiB free)`)
  }
}
