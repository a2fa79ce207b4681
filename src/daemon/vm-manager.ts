import { randomBytes } from 'node:crypto'
import { EventEmitter } from 'node:events'
import { freemem, cpus, totalmem } from 'node:os'
import { join } from 'node:path'
import type { Config } from '../core/config.js'
import { UigniterError } from '../core/errors.js'
import { formatImageRef, type ImageManifest } from '../core/image.js'
import type { Logger } from '../core/logger.js'
import type { ServiceTag, StartPath, StartTimings, Vm, VmCreateRequest, VmExit, VmState } from '../core/vm.js'
import type { ImageStore } from '../guest/image-store.js'
import type { HostNetwork } from '../net/host-network.js'
import type { SqliteStore, VmFilter } from '../store/sqlite-store.js'
import type { AccelChoice } from '../vmm/qemu/accel-probe.js'
import { waitForAppAnswer } from '../core/app-probe.js'
import { macForVm } from '../core/mac-address.js'
import { sendIdentity, waitForIdentityWait } from '../snapshot/guest-identity.js'
import type { Template } from '../snapshot/template.js'
import type { TemplateManager } from '../snapshot/template-manager.js'
import { USER_NETWORK } from '../vmm/qemu/command-line.js'
import type { QemuDriver } from '../vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../vmm/qemu/qemu-vm.js'
import { VmStateDir } from '../vmm/qemu/vm-state-dir.js'
import type { Attachment, GuestLaunches, NetworkKind } from './guest-launches.js'

export interface VmEvent { type: 'vm.state', vm: Vm }

/** What pools ask of a create beyond the API's request. */
export interface CreateInternal {
  pool?: string
  startPaused?: boolean
  waitForIdentity?: boolean
  /** Clones of a `ready: app` template: one request to the app before the create resolves. */
  warmUp?: boolean
  /** Marks the VM as a replica of this service. */
  service?: ServiceTag
}

export interface VmManagerDeps {
  config: Config
  store: SqliteStore
  images: ImageStore
  driver: QemuDriver
  /** Undefined when the host cannot make taps (not root): VMs then use user-mode networking. */
  network: HostNetwork | undefined
  launches: GuestLaunches
  templates: TemplateManager
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
  /** Creates under way: the daemon lets them finish before it closes the store. */
  readonly #inflight = new Set<Promise<Vm>>()
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
      // A template's address stays while the template does (TemplateManager frees it with the template).
      if (ip.owner.startsWith('template:')) continue
      if (!live.some((vm) => vm.id === ip.owner)) this.#deps.store.ipAllocations.release(ip.ip)
    }
    if (this.#deps.network !== undefined) {
      await this.#deps.network.cleanupOrphans(live.map((vm) => vm.id))
      for (const vm of live) if (vm.network === 'bridge' && vm.publish.length > 0) await this.#deps.network.publish(vm.id, vm.publish)
    }
    return { adopted, died }
  }

  /** The image's manifest; throws UIG_ERR_IMAGE_NOT_FOUND unless the image exists. */
  async checkImage (ref: string): Promise<ImageManifest> {
    return await this.#deps.images.get(ref)
  }

  /**
   * Creates and starts a VM, booted from its image or cloned from a
   * template; resolves once QEMU runs (a clone: once it took its identity),
   * not when the app answers. Internal options for pools: `startPaused`
   * leaves the vCPUs stopped before the first instruction (prespawned),
   * `waitForIdentity` boots to the init's wait for an assignment (booted),
   * `pool` marks the pool.
   */
  async create (request: VmCreateRequest, internal: CreateInternal = {}): Promise<Vm> {
    if ((request.image === undefined) === (request.template === undefined)) {
      throw new UigniterError('UIG_ERR_API_VALIDATION', 'give either image (to boot it) or template (to clone it), not both or neither')
    }
    if (request.template !== undefined) return await this.#clone(request.template, request, internal)
    const manifest = await this.#deps.images.get(request.image ?? '')
    const vcpus = request.vcpus ?? manifest.vcpus
    const memoryMiB = request.memoryMiB ?? manifest.memoryMiB
    checkResources(vcpus, memoryMiB)
    const vm = this.#newRecord(manifest, request, { vcpus, memoryMiB, startPath: 'cold', template: null, pool: internal.pool, service: internal.service })
    const t0 = performance.now()
    return await this.#starting(vm, async () => {
      const { launch, attachment } = await this.#deps.launches.prepare(vm.id, manifest, {
        vcpus,
        memoryMiB,
        hostname: vm.name,
        network: vm.network,
        publish: vm.publish,
        env: request.env,
        shares: request.shares,
        ...(request.args !== undefined ? { args: request.args } : {}),
        ...(request.overlaySizeMiB !== undefined ? { overlaySizeMiB: request.overlaySizeMiB } : {})
      })
      this.#attached(vm, attachment)
      const qemu = await this.#deps.driver.start({
        id: vm.id,
        stateDir: vm.stateDir,
        launch: {
          ...launch,
          ...(internal.startPaused === true ? { startPaused: true } : {}),
          ...(internal.waitForIdentity === true ? { extraCmdline: ['uigniter.wait=identity'] } : {})
        },
        ...(request.cpuAffinity !== undefined ? { cpuAffinity: request.cpuAffinity } : {})
      })
      const spawnMs = performance.now() - t0
      if (internal.waitForIdentity === true) {
        // A booted pool instance is ready once its init holds the app back; until then a claim would wait for the boot.
        await waitForIdentityWait(new VmStateDir(vm.stateDir).controlSocket, 60_000).catch(async (err: unknown) => {
          qemu.kill()
          await qemu.exited
          throw err
        })
      }
      return { qemu, timings: { spawnMs, totalMs: performance.now() - t0 }, paused: internal.startPaused === true }
    })
  }

  /** A clone of a template: the template's image, resources and app, with its own identity. */
  async #clone (name: string, request: VmCreateRequest, internal: CreateInternal): Promise<Vm> {
    const template = await this.#deps.templates.open(name)
    const { launch } = template.record
    checkCloneRequest(template, request, this.#deps.launches.networkFor(request.network))
    const vm = this.#newRecord(launch.manifest, request, { vcpus: launch.vcpus, memoryMiB: launch.memoryMiB, startPath: 'clone', template: name, pool: internal.pool, service: internal.service })
    const t0 = performance.now()
    return await this.#starting(vm, async () => {
      const attached = await this.#deps.launches.attach(vm.id, vm.network, vm.publish)
      this.#attached(vm, attached.attachment)
      const clone = await template.clone(this.#deps.driver, {
        id: vm.id,
        stateDir: vm.stateDir,
        network: attached.network,
        guestNetwork: attached.guestNetwork ?? USER_NETWORK,
        hostname: vm.name,
        env: request.env,
        identityTimeoutMs: this.#deps.config.clones.identityTimeoutMs,
        ...(attached.attachment.macAddress !== null ? { mac: attached.attachment.macAddress } : {})
      })
      vm.macAddress = clone.identity.mac
      const { probe } = template.record
      if (internal.warmUp === true && probe !== null && vm.network === 'bridge' && vm.ipAddress !== null) {
        // Under TCG a clone translates the app's code afresh on its first request (about 0.5 s for node):
        // a pool pays that before the instance counts as ready, not its first client.
        const warmStarted = performance.now()
        let ended: string | undefined
        void clone.vm.exited.then((exit) => { ended = `the clone ended: ${exit.reason}` })
        // An HTTP port is warmed with a request, so that the request path is what gets translated.
        const http = probe.httpPath !== undefined || launch.manifest.ports.some((p) => p.port === probe.port && p.protocol === 'http')
        await waitForAppAnswer({ host: vm.ipAddress, port: probe.port, ...(http ? { httpPath: probe.httpPath ?? '/', anyStatus: probe.httpPath === undefined } : {}) }, 30_000, () => ended)
          .catch(async (err: unknown) => { clone.vm.kill(); await clone.vm.exited; throw err })
        return { qemu: clone.vm, timings: { ...clone.timings, warmMs: performance.now() - warmStarted, totalMs: performance.now() - t0 }, paused: false }
      }
      return { qemu: clone.vm, timings: { ...clone.timings, totalMs: performance.now() - t0 }, paused: false }
    })
  }

  #newRecord (manifest: ImageManifest, request: VmCreateRequest, fields: { vcpus: number, memoryMiB: number, startPath: StartPath, template: string | null, pool: string | undefined, service: ServiceTag | undefined }): Vm {
    const id = randomBytes(8).toString('hex')
    const vm: Vm = {
      id,
      name: request.name ?? `${(fields.template ?? manifest.name).split('/').pop() ?? 'vm'}-${id.slice(0, 6)}`,
      image: formatImageRef(manifest),
      imageDigest: manifest.digest,
      state: 'starting',
      vcpus: fields.vcpus,
      memoryMiB: fields.memoryMiB,
      network: this.#deps.launches.networkFor(request.network),
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
      pool: fields.pool !== undefined ? { name: fields.pool, claimed: false } : null,
      startPath: fields.startPath,
      template: fields.template,
      startTimings: null,
      service: fields.service ?? null
    }
    this.#deps.store.insertVm(vm)
    this.#emit(vm)
    return vm
  }

  #attached (vm: Vm, attachment: Attachment): void {
    vm.ipAddress = attachment.ipAddress
    vm.macAddress = attachment.macAddress
    vm.tap = attachment.tap
    this.#deps.store.updateVm(vm)
  }

  /**
   * Runs a start, then records the VM as running (or paused) and follows it.
   * A start that fails releases the network and leaves the VM `failed` with
   * the reason; the error is thrown.
   */
  async #starting (vm: Vm, start: () => Promise<{ qemu: QemuVm, timings: StartTimings, paused: boolean }>): Promise<Vm> {
    const work = (async () => {
      let qemu: QemuVm | undefined
      try {
        const started = await start()
        qemu = started.qemu
        vm.pid = qemu.pid
        vm.state = started.paused ? 'paused' : 'running'
        vm.startedAt = new Date().toISOString()
        vm.startTimings = roundTimings(started.timings)
        this.#deps.store.updateVm(vm)
        if (vm.network === 'bridge' && vm.publish.length > 0) await this.#deps.network?.publish(vm.id, vm.publish)
        this.#watch(vm.id, qemu)
        this.#emit(vm)
        return vm
      } catch (err) {
        // A QEMU left running without its tap would spin on the dead device: it goes with its network.
        if (qemu !== undefined && !this.#running.has(vm.id)) {
          qemu.kill()
          await qemu.exited
        }
        await this.#releaseNetwork(vm)
        this.#finish(vm, { reason: 'boot-failed', detail: (err as Error).message, at: new Date().toISOString() }, 'failed')
        throw err
      }
    })()
    this.#inflight.add(work)
    try {
      return await work
    } finally {
      this.#inflight.delete(work)
    }
  }

  /**
   * Gives a VM that waits for its assignment (a booted pool instance) its
   * identity, with the address it already has, and so starts its app. No
   * after-clone hook runs here: the app starts after the identity, as a new
   * process of a guest that booted on its own, so it shares nothing with any
   * other instance, and it would not handle a signal or a request yet.
   * (Clones run their hook in Template.clone, before the create resolves.)
   */
  async assign (id: string, env: Record<string, string> = {}): Promise<Vm> {
    const vm = this.get(id)
    if (!this.#running.has(vm.id) || vm.state !== 'running') {
      throw new UigniterError('UIG_ERR_VM_INVALID_STATE', `VM ${vm.name} is ${vm.state}; only a running VM can take an assignment`)
    }
    const dir = new VmStateDir(vm.stateDir)
    const { spec } = await dir.readLaunch()
    await sendIdentity(dir.controlSocket, {
      guestNetwork: spec.guestNetwork ?? USER_NETWORK,
      mac: vm.macAddress ?? (spec.network.mode === 'none' ? undefined : spec.network.mac) ?? macForVm(vm.id),
      hostname: vm.name,
      env
    }, this.#deps.config.clones.identityTimeoutMs)
    return vm
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

  /** Throws UIG_ERR_TEMPLATE_NOT_FOUND unless the template can be cloned. */
  async checkTemplate (name: string): Promise<void> {
    await this.#deps.templates.open(name)
  }

  /** Records that a pool handed this VM out, and how it started for its holder. */
  markClaimed (id: string, path: StartPath): Vm {
    const vm = this.get(id)
    if (vm.pool !== null) {
      vm.pool = { ...vm.pool, claimed: true }
      vm.startPath = path
      this.#deps.store.updateVm(vm)
      this.#emit(vm)
    }
    return vm
  }

  /** Marks a VM (claimed from a pool) as a replica of a service. */
  setService (id: string, service: ServiceTag): Vm {
    const vm = this.get(id)
    vm.service = service
    this.#deps.store.updateVm(vm)
    this.#emit(vm)
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

  /**
   * Stops watching without stopping VMs: they outlive the daemon. Creates
   * under way may finish first (up to `graceMs`), so that none is left half
   * recorded; the next daemon adopts what runs.
   */
  async close (graceMs = 15_000): Promise<void> {
    const settled = Promise.allSettled([...this.#inflight])
    await Promise.race([settled, new Promise((resolve) => setTimeout(resolve, graceMs).unref())])
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

/** A clone is its template's guest: nothing that would change its devices or its boot can be asked for. */
function checkCloneRequest (template: Template, request: VmCreateRequest, network: NetworkKind): void {
  const { launch } = template.record
  const refuse = (what: string): never => { throw new UigniterError('UIG_ERR_CLONE_REQUEST', `a clone of template ${template.id} ${what}`) }
  if (request.args !== undefined) refuse('runs the arguments its template booted with; make another template to change them')
  if (template.record.ready === 'app' && Object.keys(request.env).length > 0) {
    refuse('keeps the environment its app started with (the template was taken at ready: app); make a template with ready: init to give each clone its own')
  }
  if (request.shares.length > 0) refuse('cannot have shared directories: they are devices its template did not have')
  if (request.overlaySizeMiB !== undefined) refuse('cannot have an overlay disk: it is a device its template did not have')
  if (request.vcpus !== undefined && request.vcpus !== launch.vcpus) refuse(`has its template's ${launch.vcpus} vCPU(s)`)
  if (request.memoryMiB !== undefined && request.memoryMiB !== launch.memoryMiB) refuse(`has its template's ${launch.memoryMiB} MiB of memory`)
  const templateNetwork = launch.network.mode === 'tap' ? 'bridge' : launch.network.mode
  if (network !== templateNetwork) refuse(`uses its template's network (${templateNetwork}), not ${network}`)
}

function roundTimings (t: StartTimings): StartTimings {
  return Object.fromEntries(Object.entries(t).map(([k, v]) => [k, Math.round(v * 10) / 10])) as StartTimings
}
