import { createHash } from 'node:crypto'
import { mkdir, readFile, rm, rmdir, statfs } from 'node:fs/promises'
import { dirname, join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { waitForAppAnswer, type AppProbe } from '../core/app-probe.js'
import { UigniterError } from '../core/errors.js'
import { writeFileAtomic } from '../core/fs-atomic.js'
import { hookAddress, httpHook, signalHook, type ResolvedAfterClone } from './after-clone.js'
import { macForVm } from '../core/mac-address.js'
import { checkIdentityEnv, sendIdentity, waitForIdentityWait } from './guest-identity.js'
import type { GuestLaunch, GuestNetwork, GuestVm, LaunchNetwork, VmmDriver } from '../core/ports/vmm-driver.js'
import { StepClock } from '../core/start-steps.js'

/** What template.json holds: enough to clone the template again after a daemon restart. */
export interface TemplateRecord {
  version: 1
  id: string
  /**
   * The point the template was taken at. `init`: the init waits for an
   * identity before it starts the app. `app`: the app runs and answered its
   * probe; clones take their identity under it, so they keep its env.
   */
  ready: 'init' | 'app'
  /** What answered for `ready: app`: the guest port, and the HTTP path when one was asked. */
  probe: { port: number, httpPath?: string } | null
  /** The template VM's launch; clones start with the same one, bar the network and the memory's sharing. */
  launch: GuestLaunch
  /** Guest RAM (shared by every clone, copy-on-write) and QEMU's device state. */
  memoryPath: string
  statePath: string
  createdAt: string
  /** Milliseconds: boot to the init's wait, and the migration to state.bin. */
  timings: { bootMs: number, saveMs: number }
  /** ready: app — what each clone's app is told once it took its identity, before the clone is returned. */
  afterClone: ResolvedAfterClone | null
  /** Whether clones share no app state that must differ (ready: init, a clone-safe image, or a hook). */
  cloneSafe: boolean
}

export interface TemplateCreateOptions {
  id: string
  /** The template lives in `<dataDir>/templates/<id>/`. */
  dataDir: string
  /** The guest to boot; its memory backend and wait point are the template's business. */
  launch: Omit<GuestLaunch, 'memory' | 'incoming' | 'overlaySizeMiB'>
  /**
   * Where memory.ram goes: the template directory when it is on tmpfs, else
   * `/dev/shm/uigniter-templates/<hash of the template directory>-<id>`, so
   * that two data directories never share one. Measured here: clones start
   * as fast from a disk file (page cache), but the template's RAM would be
   * written back to the disk for nothing.
   */
  memoryDir?: string
  /** Boot to the ready point (default 60 s). */
  bootTimeoutMs?: number
  /** `init` (default) or `app`; `app` needs `probe`. */
  ready?: 'init' | 'app'
  /** For `ready: app`: where the host reaches the app (the template's tap address, or a user-mode forward), and its guest port. */
  probe?: AppProbe & { guestPort: number }
  /** For `ready: app`: the after-clone hook every clone runs (default none). */
  afterClone?: ResolvedAfterClone | null
  /** Recorded as given (default: ready init, or a hook). */
  cloneSafe?: boolean
}

export interface CloneOptions {
  /** The clone's VM id and state directory (usually VmStateDir.of(dataDir, id)). */
  id: string
  stateDir: string
  /** How the clone's NIC reaches the world: its own port forwards or tap. */
  network: LaunchNetwork
  /** The clone's address; user-mode forwards are pointed at it. */
  guestNetwork: GuestNetwork
  hostname: string
  /** A locally administered random MAC when absent (and the network names none). */
  mac?: string
  /** Added to the image's environment for the app, which starts after the identity. */
  env?: Record<string, string>
  /** Deadline for the restore, and for the identity handshake (default 5 s each). */
  restoreTimeoutMs?: number
  identityTimeoutMs?: number
}

export interface CloneResult<V extends GuestVm = GuestVm> {
  vm: V
  /** The identity the guest took. */
  identity: { address: string, mac: string, hostname: string }
}

const TMPFS_MAGIC = 0x01021994
/** From the app's answer to the snapshot (ready: app). */
const QUIESCE_MS = 200

/**
 * A snapshot of a guest stopped where its init waits for an identity, from
 * which clones start in a fraction of a boot (design.md fact 5): the RAM
 * stays in a file that every clone maps copy-on-write, and only the device
 * state (tens of KB) is saved and restored. Each clone must take its own
 * address, MAC, hostname, RNG state and clock before its app starts; one
 * whose handshake fails is killed, never returned.
 *
 * @example
 * const template = await Template.create(driver, { id: 'hello', dataDir, launch })
 * const { vm } = await template.clone(driver, { id: 'c1', stateDir: VmStateDir.of(dataDir, 'c1').dir,
 *   network: { mode: 'user', forwards }, guestNetwork: { ...USER_NETWORK, address: '10.0.2.16' }, hostname: 'c1' })
 */
export class Template {
  readonly id: string
  readonly dir: string
  readonly record: TemplateRecord

  private constructor (dir: string, record: TemplateRecord) {
    this.id = record.id
    this.dir = dir
    this.record = record
  }

  /** The directory of template `id` under a data directory. */
  static dirOf (dataDir: string, id: string): string {
    return join(resolve(dataDir), 'templates', id)
  }

  /**
   * Boots the image with its RAM in a shared file and waits for the ready
   * point: the init holding the app back (`uigniter.wait=identity`), or the
   * app answering its probe. Then it pauses the guest, saves the device
   * state without the RAM (`x-ignore-shared`) and ends the VM.
   * Throws UIG_ERR_TEMPLATE_FAILED; nothing is left behind on failure.
   */
  static async create (driver: VmmDriver, options: TemplateCreateOptions): Promise<Template> {
    const { id } = options
    const ready = options.ready ?? 'init'
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(id)) throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', `invalid template id "${id}"`)
    if (options.launch.manifest.init === null) throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', 'a template needs our guest init (to take a clone\'s identity), and a unikernel has none')
    if (ready === 'app' && options.probe === undefined) throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', 'a template taken at ready: app needs a port to probe')
    const dir = Template.dirOf(options.dataDir, id)
    const memoryDir = options.memoryDir ?? await defaultMemoryDir(options.dataDir, id)
    const memoryPath = join(memoryDir, 'memory.ram')
    const statePath = join(dir, 'state.bin')
    const vmDir = join(dir, 'vm')
    await rm(dir, { recursive: true, force: true })
    await rm(memoryPath, { force: true })
    await mkdir(dir, { recursive: true, mode: 0o700 })
    await mkdir(memoryDir, { recursive: true, mode: 0o700 })

    const launch: GuestLaunch = {
      ...options.launch,
      memory: { path: memoryPath, share: true },
      extraCmdline: [...(options.launch.extraCmdline ?? []), ...(ready === 'init' ? ['uigniter.wait=identity'] : [])]
    }
    const timeoutMs = options.bootTimeoutMs ?? 60_000
    const t0 = Date.now()
    let vm: GuestVm | undefined
    try {
      const started = await driver.spawn({ id: `template-${id}`, stateDir: vmDir, launch })
      vm = started
      await started.waitForMarker('init', timeoutMs)
      const left = (): number => Math.max(1000, timeoutMs - (Date.now() - t0))
      if (ready === 'init') await waitForIdentityWait(controlSocketOf(started), left(), options.launch.manifest.init?.version)
      else if (options.probe !== undefined) {
        let ended: string | undefined
        void started.exited.then((exit) => { ended = `the template VM ended: ${exit.reason}: ${exit.detail}` })
        await waitForAppAnswer(options.probe, left(), () => ended)
        // Under TCG the guest may still be tearing the probe's connection down: let it finish,
        // or the app could be caught mid-connection in every clone.
        await sleep(QUIESCE_MS)
      }
      const bootMs = Date.now() - t0
      const t1 = Date.now()
      await started.saveState(statePath, 30_000)
      const saveMs = Date.now() - t1
      // Paused after its save, the template VM cannot shut down as a guest; nothing of it is needed any more.
      started.kill()
      await started.exited
      const probe = options.probe !== undefined && ready === 'app'
        ? { port: options.probe.guestPort, ...(options.probe.httpPath !== undefined ? { httpPath: options.probe.httpPath } : {}) }
        : null
      const afterClone = ready === 'app' ? options.afterClone ?? null : null
      const cloneSafe = options.cloneSafe ?? (ready === 'init' || afterClone !== null)
      const record: TemplateRecord = { version: 1, id, ready, probe, launch: options.launch, memoryPath, statePath, createdAt: new Date().toISOString(), timings: { bootMs, saveMs }, afterClone, cloneSafe }
      await writeFileAtomic(join(dir, 'template.json'), JSON.stringify(record, null, 2) + '\n')
      await rm(vmDir, { recursive: true, force: true })
      return new Template(dir, record)
    } catch (err) {
      const console = vm !== undefined ? (await vm.readConsole({ tailBytes: 1500 }).catch(() => '')).trim() : ''
      if (vm !== undefined) { vm.kill(); await vm.exited }
      await rm(dir, { recursive: true, force: true })
      await rm(memoryPath, { force: true })
      throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', `cannot make template ${id}: ${(err as Error).message}${console !== '' ? `; console: ${console.split('\n').slice(-5).join(' | ')}` : ''}`, { cause: err })
    }
  }

  /** Removes whatever a template's making left behind, complete or not, when it used the default memory directory. */
  static async discard (dataDir: string, id: string): Promise<void> {
    const memoryDir = await defaultMemoryDir(dataDir, id)
    await rm(join(memoryDir, 'memory.ram'), { force: true })
    await rm(Template.dirOf(dataDir, id), { recursive: true, force: true })
    await rmdir(memoryDir).catch(() => {})
  }

  /** Opens a template made earlier, from its template.json. Throws UIG_ERR_TEMPLATE_NOT_FOUND. */
  static async open (dataDir: string, id: string): Promise<Template> {
    const dir = Template.dirOf(dataDir, id)
    try {
      // Records from before `ready: app` have no probe; from before after-clone hooks, no hook.
      const parsed = JSON.parse(await readFile(join(dir, 'template.json'), 'utf8')) as Omit<TemplateRecord, 'probe' | 'afterClone' | 'cloneSafe'> & Partial<Pick<TemplateRecord, 'probe' | 'afterClone' | 'cloneSafe'>>
      const record: TemplateRecord = { ...parsed, probe: parsed.probe ?? null, afterClone: parsed.afterClone ?? null, cloneSafe: parsed.cloneSafe ?? parsed.ready === 'init' }
      if (record.version !== 1 || record.id !== id) throw new Error('unexpected content')
      return new Template(dir, record)
    } catch (err) {
      throw new UigniterError('UIG_ERR_TEMPLATE_NOT_FOUND', `no usable template "${id}" in ${dir}: ${(err as Error).message}`, { cause: err })
    }
  }

  /**
   * Starts a clone: QEMU with the template's launch but the RAM file mapped
   * private and `-incoming defer`, restores the device state, resumes it, and
   * gives the guest its identity over the control channel, then runs the
   * template's after-clone hook (ready: app; a ready: init clone's app starts
   * after the identity, a new process already). A clone whose restore,
   * identity or hook fails within its deadline is killed and the error
   * thrown (UIG_ERR_CLONE_RESTORE, UIG_ERR_CLONE_IDENTITY,
   * UIG_ERR_CLONE_HOOK_FAILED).
   */
  async clone<V extends GuestVm> (driver: VmmDriver<V>, options: CloneOptions, clock = new StepClock('clone')): Promise<CloneResult<V>> {
    if (this.record.ready === 'app' && Object.keys(options.env ?? {}).length > 0) {
      throw new UigniterError('UIG_ERR_CLONE_REQUEST', `template ${this.id} was taken with its app running (ready: app), so every clone keeps the app's environment; make a template with ready: init to give each clone its own`)
    }
    checkIdentityEnv(options.env ?? {})
    const mac = (options.mac ?? (options.network.mode !== 'none' ? options.network.mac : undefined) ?? macForVm(options.id)).toLowerCase()
    const network = withGuestAddress(options.network, options.guestNetwork.address)
    const hook = this.record.ready === 'app' ? this.record.afterClone : null
    const hookAt = hook !== null ? hookAddress(hook, network, options.guestNetwork.address) : undefined
    const vm = await clock.run('spawn', async () => await driver.spawn({
      id: options.id,
      stateDir: options.stateDir,
      launch: { ...this.record.launch, network, memory: { path: this.record.memoryPath, share: false }, incoming: 'defer' },
      // QEMU inherits the state file open: a jailed one could not see it, nor exec cat.
      incomingState: this.record.statePath
    }))
    try {
      await clock.run('restore', async () => {
        try {
          await vm.restoreState(options.restoreTimeoutMs ?? 5000)
        } catch (err) {
          throw new UigniterError('UIG_ERR_CLONE_RESTORE', `clone ${options.id} could not restore template ${this.id}: ${(err as Error).message}`, { cause: err })
        }
      })
      const identityTimeout = options.identityTimeoutMs ?? 5000
      try {
        // The signal hook goes over the identity's channel, right after it: one connection, no second handshake.
        const endIdentity = clock.begin('identity')
        try {
          const taken = await sendIdentity(controlSocketOf(vm), { guestNetwork: options.guestNetwork, mac, hostname: options.hostname, env: options.env ?? {} }, identityTimeout, async (channel) => {
            endIdentity()
            if (hook?.kind === 'signal') await clock.run('after-clone', async () => { await signalHook(channel, hook) })
          })
          clock.noteGuestMs('identity', taken.guestMs)
        } finally {
          endIdentity()
        }
        if (hook?.kind === 'http' && hookAt !== undefined) await clock.run('after-clone', async () => { await httpHook(hookAt, hook) })
      } catch (err) {
        if (err instanceof UigniterError && err.code === 'UIG_ERR_CLONE_HOOK_FAILED') {
          throw new UigniterError('UIG_ERR_CLONE_HOOK_FAILED', `clone ${options.id} of template ${this.id}: ${err.message}`, { cause: err })
        }
        throw new UigniterError('UIG_ERR_CLONE_IDENTITY', `clone ${options.id} of template ${this.id}: ${(err as Error).message}`, { cause: err })
      }
      return { vm, identity: { address: options.guestNetwork.address, mac, hostname: options.hostname } }
    } catch (err) {
      // Never hand out a clone that may still carry its template's identity.
      vm.kill()
      await vm.exited
      throw err
    }
  }

  /** Deletes the template's files, its RAM file included. Live clones keep their mappings; new clones cannot start. */
  async remove (): Promise<void> {
    await rm(this.record.memoryPath, { force: true })
    await rm(this.dir, { recursive: true, force: true })
    // The RAM's own directory, when it was made for this template; a shared one stays while it holds others.
    await rmdir(dirname(this.record.memoryPath)).catch(() => {})
  }
}

/** QEMU's user-mode forwards go to 10.0.2.15 unless told otherwise; a clone may have another address. */
function withGuestAddress (network: LaunchNetwork, address: string): LaunchNetwork {
  if (network.mode !== 'user') return network
  return { ...network, forwards: network.forwards.map((f) => ({ ...f, guestAddress: f.guestAddress ?? address })) }
}

/** See TemplateCreateOptions.memoryDir. Exported for what must find a template's RAM file without its record (a test lab's cleanup). */
export async function defaultMemoryDir (dataDir: string, id: string): Promise<string> {
  const dir = Template.dirOf(dataDir, id)
  return await onTmpfs(dataDir) ? dir : join('/dev/shm/uigniter-templates', `${createHash('sha256').update(dir).digest('hex').slice(0, 12)}-${id}`)
}

async function onTmpfs (path: string): Promise<boolean> {
  try {
    return (await statfs(path)).type === TMPFS_MAGIC
  } catch {
    return false
  }
}

/** Our init's control channel; a template needs one (Template.create refuses images without our init). */
function controlSocketOf (vm: GuestVm): string {
  if (vm.controlSocket === undefined) throw new UigniterError('UIG_ERR_CONTROL_CHANNEL', `VM ${vm.id} has no control channel (its image has no uigniter init)`)
  return vm.controlSocket
}
