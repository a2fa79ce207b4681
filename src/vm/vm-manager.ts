import { randomBytes } from 'node:crypto'
import { EventEmitter } from 'node:events'
import { freemem, cpus, totalmem } from 'node:os'
import { join } from 'node:path'
import { waitForAppAnswer } from '../core/app-probe.js'
import { UigniterError } from '../core/errors.js'
import { formatImageRef, type ImageManifest } from '../core/image.js'
import type { Logger } from '../core/logger.js'
import { macForVm } from '../core/mac-address.js'
import type { HostNetworking } from '../core/ports/host-networking.js'
import type { ImageRepository } from '../core/ports/image-repository.js'
import type { StateStore, VmFilter } from '../core/ports/state-store.js'
import { USER_NETWORK, type GuestVm, type VmmDriver } from '../core/ports/vmm-driver.js'
import { StepClock, withClaimSteps, type StartPlan } from '../core/start-steps.js'
import type { ServiceTag, StartPath, StartStep, Vm, VmCreateRequest, VmExit, VmState } from '../core/vm.js'
import { sendIdentity, waitForIdentityWait } from '../snapshot/guest-identity.js'
import type { Template } from '../snapshot/template.js'
import type { VolumeManager } from '../volume/volume-manager.js'
import type { Attachment, GuestLaunches, NetworkKind } from './guest-launches.js'

export interface VmEvent { type: 'vm.state', vm: Vm }

/** Who a VM belongs to, beyond the API's request: recorded on the VM. */
export interface VmTags {
  pool?: string
  /** Marks the VM as a replica of this service. */
  service?: ServiceTag
}

/** The volumes as the VM lifecycle needs them: checked and resolved to their files. */
export type VolumeAttacher = Pick<VolumeManager, 'checkAttach'>

/** The pool kinds' start plans (PoolManager's instances): see START_PLANS. */
export type PoolPlan = 'prespawned' | 'booted' | 'clone'

/** Templates as the VM lifecycle needs them: found by name. */
export interface TemplateSource {
  open: (name: string) => Promise<Template>
}

export interface VmManagerDeps {
  dataDir: string
  store: StateStore
  images: ImageRepository
  driver: VmmDriver
  /** Undefined when the host cannot make taps (not root): VMs then use user-mode networking. */
  network: HostNetworking | undefined
  launches: GuestLaunches
  templates: TemplateSource
  volumes: VolumeAttacher
  accel: { accel: string }
  /** A clone's or an assignment's identity handshake (clones.identityTimeoutMs). */
  identityTimeoutMs: number
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
  readonly #running = new Map<string, GuestVm>()
  /** Creates under way: the daemon lets them finish before it closes the store. */
  readonly #inflight = new Set<Promise<Vm>>()
  /** Settles once a VM's end is recorded and its network released. */
  readonly #finished = new Map<string, Promise<void>>()

  constructor (deps: VmManagerDeps) {
    super()
    this.#deps = deps
  }

  /**
   * After a daemon (re)start: every VM the store says is live goes through
   * the `adopted` plan (find its VMM again, publish its ports, record it);
   * the ones that died meanwhile are marked, and network leftovers (taps,
   * rules, addresses) that no live VM owns are removed.
   */
  async recover (): Promise<{ adopted: number, died: number }> {
    let died = 0
    const adopted: Array<{ vm: Vm, guest: GuestVm, clock: StepClock }> = []
    for (const vm of this.#deps.store.listVms({ state: LIVE })) {
      const clock = new StepClock('adopted')
      let found: Awaited<ReturnType<VmmDriver['adopt']>>
      try {
        found = await clock.run('adopt', async () => await this.#deps.driver.adopt(vm.stateDir))
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
      adopted.push({ vm, guest: found, clock })
    }
    const liveIds = new Set(adopted.map((a) => a.vm.id))
    // Taps and forwards of the VMs that died go first, so that no dead VM's forward clashes with a live one's.
    await this.#deps.network?.cleanupOrphans([...liveIds])
    for (const { vm, guest, clock } of adopted) {
      await this.#publishPorts(vm, clock)
      await clock.run('record', () => { this.#watch(vm.id, guest) })
      // The record keeps the VM's own start; the adoption's steps are logged.
      this.#deps.log.info({ vm: vm.id, steps: clock.timings().steps }, 'adopted a running VM')
    }
    for (const ip of this.#deps.store.ipAllocations.list()) {
      // A template's address stays while the template does (TemplateManager frees it with the template).
      if (ip.owner.startsWith('template:')) continue
      if (!liveIds.has(ip.owner)) this.#deps.store.ipAllocations.release(ip.ip)
    }
    return { adopted: adopted.length, died }
  }

  /** The image's manifest; throws UIG_ERR_IMAGE_NOT_FOUND unless the image exists. */
  async checkImage (ref: string): Promise<ImageManifest> {
    return await this.#deps.images.get(ref)
  }

  /**
   * Creates and starts a VM: the `cold` plan for an image, the `clone` plan
   * for a template. Resolves once the VMM runs (a clone: once it took its
   * identity), not when the app answers.
   */
  async create (request: VmCreateRequest, tags: VmTags = {}): Promise<Vm> {
    if ((request.image === undefined) === (request.template === undefined)) {
      throw new UigniterError('UIG_ERR_API_VALIDATION', 'give either image (to boot it) or template (to clone it), not both or neither')
    }
    if (request.template !== undefined) return await this.#clone(request.template, request, tags, false)
    return await this.#boot('cold', request, tags)
  }

  /**
   * A pool's instance, by the pool kind's plan: `prespawned` (vCPUs stopped
   * before the first instruction), `booted` (booted to the init's wait for
   * an identity), `clone` (a clone warmed up with one request to its app).
   */
  async createForPool (plan: PoolPlan, request: VmCreateRequest, pool: string): Promise<Vm> {
    if (plan === 'clone') {
      if (request.template === undefined) throw new UigniterError('UIG_ERR_API_VALIDATION', 'a clone pool\'s instance needs a template')
      return await this.#clone(request.template, request, { pool }, true)
    }
    return await this.#boot(plan, request, { pool })
  }

  /** The `cold`, `prespawned` and `booted` plans: a VM booted from its image. */
  async #boot (plan: Extract<StartPlan, 'cold' | 'prespawned' | 'booted'>, request: VmCreateRequest, tags: VmTags): Promise<Vm> {
    const clock = new StepClock(plan)
    const manifest = await clock.run('resolve-image', async () => await this.#deps.images.get(request.image ?? ''))
    const vcpus = request.vcpus ?? manifest.vcpus
    const memoryMiB = request.memoryMiB ?? manifest.memoryMiB
    await clock.run('check-resources', () => { checkResources(vcpus, memoryMiB) })
    // Checked and recorded in one turn of the event loop: no other create can take a read-write volume in between.
    const volumes = this.#deps.volumes.checkAttach(request.volumes ?? [])
    const vm = this.#newRecord(manifest, request, { vcpus, memoryMiB, startPath: 'cold', template: null, tags })
    return await this.#starting(vm, clock, async () => {
      const { launch, attachment } = await clock.run('attach-network', async () => await this.#deps.launches.prepare(vm.id, manifest, {
        vcpus,
        memoryMiB,
        hostname: vm.name,
        network: vm.network,
        publish: vm.publish,
        env: request.env,
        shares: request.shares,
        volumes,
        ...(request.args !== undefined ? { args: request.args } : {}),
        // A container image expects a writable root: its manifest gives the overlay a request does not name.
        ...((request.overlaySizeMiB ?? manifest.overlaySizeMiB) !== undefined ? { overlaySizeMiB: request.overlaySizeMiB ?? manifest.overlaySizeMiB } : {})
      }))
      this.#attached(vm, attachment)
      const guest = await clock.run('spawn', async () => await this.#deps.driver.spawn({
        id: vm.id,
        stateDir: vm.stateDir,
        launch: {
          ...launch,
          ...(plan === 'prespawned' ? { startPaused: true } : {}),
          ...(plan === 'booted' ? { extraCmdline: ['uigniter.wait=identity'] } : {})
        },
        ...(request.cpuAffinity !== undefined ? { cpuAffinity: request.cpuAffinity } : {})
      }))
      if (plan === 'booted') {
        // A booted pool instance is ready once its init holds the app back; until then a claim would wait for the boot.
        await clock.run('boot', async () => {
          await waitForIdentityWait(controlSocketOf(guest), 60_000, manifest.init?.version).catch(async (err: unknown) => {
            guest.kill()
            await guest.exited
            throw err
          })
        })
      }
      return { guest, paused: plan === 'prespawned' }
    })
  }

  /** The `clone` plan: the template's image, resources and app, with its own identity. */
  async #clone (name: string, request: VmCreateRequest, tags: VmTags, warmUp: boolean): Promise<Vm> {
    const clock = new StepClock('clone')
    if ((request.volumes ?? []).length > 0) {
      throw new UigniterError('UIG_ERR_VOLUME_TEMPLATE', `a clone of template ${name} cannot take volumes: it resumes its template's devices, and every clone would share the template's disks; boot the image instead (start path cold)`)
    }
    const template = await clock.run('resolve-template', async () => await this.#deps.templates.open(name))
    const { launch } = template.record
    await clock.run('check-request', () => { checkCloneRequest(template, request, this.#deps.launches.networkFor(request.network)) })
    const vm = this.#newRecord(launch.manifest, request, { vcpus: launch.vcpus, memoryMiB: launch.memoryMiB, startPath: 'clone', template: name, tags })
    return await this.#starting(vm, clock, async () => {
      const attached = await clock.run('attach-network', async () => await this.#deps.launches.attach(vm.id, vm.network, vm.publish))
      this.#attached(vm, attached.attachment)
      const clone = await template.clone(this.#deps.driver, {
        id: vm.id,
        stateDir: vm.stateDir,
        network: attached.network,
        guestNetwork: attached.guestNetwork ?? USER_NETWORK,
        hostname: vm.name,
        env: request.env,
        identityTimeoutMs: this.#deps.identityTimeoutMs,
        ...(attached.attachment.macAddress !== null ? { mac: attached.attachment.macAddress } : {})
      }, clock)
      vm.macAddress = clone.identity.mac
      const { probe } = template.record
      if (warmUp && probe !== null && vm.network === 'bridge' && vm.ipAddress !== null) {
        // Under TCG a clone translates the app's code afresh on its first request (about 0.5 s for node):
        // a pool pays that before the instance counts as ready, not its first client.
        const host = vm.ipAddress
        await clock.run('warm-up', async () => {
          let ended: string | undefined
          void clone.vm.exited.then((exit) => { ended = `the clone ended: ${exit.reason}` })
          // An HTTP port is warmed with a request, so that the request path is what gets translated.
          const http = probe.httpPath !== undefined || launch.manifest.ports.some((p) => p.port === probe.port && p.protocol === 'http')
          await waitForAppAnswer({ host, port: probe.port, ...(http ? { httpPath: probe.httpPath ?? '/', anyStatus: probe.httpPath === undefined } : {}) }, 30_000, () => ended)
            .catch(async (err: unknown) => { clone.vm.kill(); await clone.vm.exited; throw err })
        })
      }
      return { guest: clone.vm, paused: false }
    })
  }

  #newRecord (manifest: ImageManifest, request: VmCreateRequest, fields: { vcpus: number, memoryMiB: number, startPath: StartPath, template: string | null, tags: VmTags }): Vm {
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
      stateDir: join(this.#deps.dataDir, 'vms', id),
      createdAt: new Date().toISOString(),
      startedAt: null,
      exit: null,
      pool: fields.tags.pool !== undefined ? { name: fields.tags.pool, claimed: false } : null,
      startPath: fields.startPath,
      template: fields.template,
      startTimings: null,
      service: fields.tags.service ?? null,
      ...(request.volumes !== undefined && request.volumes.length > 0 ? { volumes: request.volumes } : {})
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

  /** The `publish-ports` step: host ports forwarded to a bridged VM (idempotent: a forward in place is kept). */
  async #publishPorts (vm: Vm, clock: StepClock): Promise<void> {
    const network = this.#deps.network
    if (vm.network !== 'bridge' || vm.publish.length === 0 || network === undefined) return
    await clock.run('publish-ports', async () => { await network.publish(vm.id, vm.publish) })
  }

  /**
   * Runs a start's steps up to a running guest, then its last steps
   * (publish-ports, record), and follows the VM. A start that fails releases
   * the network and leaves the VM `failed` with the reason; the error is thrown.
   */
  async #starting (vm: Vm, clock: StepClock, start: () => Promise<{ guest: GuestVm, paused: boolean }>): Promise<Vm> {
    const work = (async () => {
      let guest: GuestVm | undefined
      try {
        const started = await start()
        guest = started.guest
        await this.#publishPorts(vm, clock)
        const running = guest
        await clock.run('record', () => {
          vm.pid = running.pid
          vm.state = started.paused ? 'paused' : 'running'
          vm.startedAt = new Date().toISOString()
          vm.startTimings = clock.timings()
          this.#deps.store.updateVm(vm)
        })
        // The record step's own time is in the list now too.
        vm.startTimings = clock.timings()
        this.#deps.store.updateVm(vm)
        this.#watch(vm.id, running)
        this.#emit(vm)
        return vm
      } catch (err) {
        // A VMM left running without its tap would spin on the dead device: it goes with its network.
        if (guest !== undefined && !this.#running.has(vm.id)) {
          guest.kill()
          await guest.exited
        }
        await this.#releaseNetwork(vm)
        vm.startTimings = clock.timings()
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
    const guest = this.#running.get(vm.id)
    if (guest === undefined || vm.state !== 'running') {
      throw new UigniterError('UIG_ERR_VM_INVALID_STATE', `VM ${vm.name} is ${vm.state}; only a running VM can take an assignment`)
    }
    // The address plan it was given at its attach, as its launch recorded it.
    const guestNetwork = (await this.#deps.driver.launchOf(vm.stateDir)).guestNetwork ?? USER_NETWORK
    await sendIdentity(controlSocketOf(guest), {
      guestNetwork,
      mac: vm.macAddress ?? macForVm(vm.id),
      hostname: vm.name,
      env
    }, this.#deps.identityTimeoutMs)
    return vm
  }

  /** Follows a guest to its end and records how it ended. */
  #watch (id: string, guest: GuestVm): void {
    this.#running.set(id, guest)
    const finished = guest.exited.then(async (exit) => {
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
    const guest = this.#running.get(vm.id)
    if (guest === undefined) return vm
    if (vm.state !== 'stopping') {
      vm.state = 'stopping'
      this.#deps.store.updateVm(vm)
      this.#emit(vm)
    }
    await guest.stop({ graceMs })
    await this.#finished.get(vm.id)
    return this.get(vm.id)
  }

  /** SIGKILL, at once; idempotent like stop. */
  async kill (idOrName: string): Promise<Vm> {
    const vm = this.get(idOrName)
    const guest = this.#running.get(vm.id)
    if (guest === undefined) return vm
    guest.kill()
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
    const guest = this.#running.get(vm.id)
    const from: VmState = paused ? 'running' : 'paused'
    if (vm.state === (paused ? 'paused' : 'running')) return vm
    if (guest === undefined || vm.state !== from) {
      throw new UigniterError('UIG_ERR_VM_INVALID_STATE', `VM ${vm.name} is ${vm.state}; only a ${from} VM can be ${paused ? 'paused' : 'resumed'}`)
    }
    if (paused) await guest.pause()
    else await guest.resume()
    vm.state = paused ? 'paused' : 'running'
    this.#deps.store.updateVm(vm)
    this.#emit(vm)
    return vm
  }

  /** Throws UIG_ERR_TEMPLATE_NOT_FOUND unless the template can be cloned. */
  async checkTemplate (name: string): Promise<void> {
    await this.#deps.templates.open(name)
  }

  /**
   * Records that a pool handed this VM out, how it started for its holder,
   * and the claim's steps after the instance's own.
   */
  markClaimed (id: string, path: StartPath, claim: { steps: StartStep[], totalMs: number }): Vm {
    const vm = this.get(id)
    if (vm.pool !== null) {
      vm.pool = { ...vm.pool, claimed: true }
      vm.startPath = path
      vm.startTimings = withClaimSteps(vm.startTimings, claim.steps, claim.totalMs)
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
    for (const guest of this.#running.values()) guest.close()
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

/** Our init's control channel: pools and assignments need one. */
function controlSocketOf (guest: GuestVm): string {
  if (guest.controlSocket === undefined) throw new UigniterError('UIG_ERR_CONTROL_CHANNEL', `VM ${guest.id} has no control channel (its image has no uigniter init)`)
  return guest.controlSocket
}
