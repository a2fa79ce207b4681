import { createHash, randomBytes } from 'node:crypto'
import { mkdir, readFile, rm, rmdir, statfs } from 'node:fs/promises'
import { dirname, join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { UigniterError } from '../core/errors.js'
import { writeFileAtomic } from '../core/fs-atomic.js'
import { encodeParam, type GuestNetwork, type LaunchNetwork } from '../vmm/qemu/command-line.js'
import { ControlChannel } from '../vmm/qemu/control-channel.js'
import type { GuestLaunch, QemuDriver } from '../vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../vmm/qemu/qemu-vm.js'
import { VmStateDir } from '../vmm/qemu/vm-state-dir.js'

/** What template.json holds: enough to clone the template again after a daemon restart. */
export interface TemplateRecord {
  version: 1
  id: string
  /** The point the template was taken at; `init`: the init waits for an identity before starting the app. */
  ready: 'init'
  /** The template VM's launch; clones start with the same one, bar the network and the memory's sharing. */
  launch: GuestLaunch
  /** Guest RAM (shared by every clone, copy-on-write) and QEMU's device state. */
  memoryPath: string
  statePath: string
  createdAt: string
  /** Milliseconds: boot to the init's wait, and the migration to state.bin. */
  timings: { bootMs: number, saveMs: number }
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
  /** Boot to the init's wait point (default 60 s). */
  bootTimeoutMs?: number
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

export interface CloneResult {
  vm: QemuVm
  /** The identity the guest took. */
  identity: { address: string, mac: string, hostname: string }
  /** Milliseconds from the clone's start: QEMU up with its monitor, state restored and running, identity taken. */
  timings: { spawnMs: number, restoreMs: number, identityMs: number }
}

const TMPFS_MAGIC = 0x01021994
/** ip, gw, mac, hostname, seed, time: the init takes 16 arguments per command. */
const MAX_IDENTITY_ENV = 10

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
   * Boots the image with its RAM in a shared file and `uigniter.wait=identity`,
   * waits until the init holds the app back, then pauses it, saves the
   * device state without the RAM (`x-ignore-shared`) and ends the VM.
   * Throws UIG_ERR_TEMPLATE_FAILED; nothing is left behind on failure.
   */
  static async create (driver: QemuDriver, options: TemplateCreateOptions): Promise<Template> {
    const { id } = options
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(id)) throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', `invalid template id "${id}"`)
    if (options.launch.manifest.init === null) throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', 'a template needs our guest init (to take a clone\'s identity), and a unikernel has none')
    const dir = Template.dirOf(options.dataDir, id)
    const memoryDir = options.memoryDir ??
      (await onTmpfs(options.dataDir) ? dir : join('/dev/shm/uigniter-templates', `${createHash('sha256').update(dir).digest('hex').slice(0, 12)}-${id}`))
    const memoryPath = join(memoryDir, 'memory.ram')
    const statePath = join(dir, 'state.bin')
    const vmDir = new VmStateDir(join(dir, 'vm'))
    await rm(dir, { recursive: true, force: true })
    await rm(memoryPath, { force: true })
    await mkdir(dir, { recursive: true, mode: 0o700 })
    await mkdir(memoryDir, { recursive: true, mode: 0o700 })

    const launch: GuestLaunch = {
      ...options.launch,
      memory: { path: memoryPath, share: true },
      extraCmdline: [...(options.launch.extraCmdline ?? []), 'uigniter.wait=identity']
    }
    const t0 = Date.now()
    let vm: QemuVm | undefined
    try {
      vm = await driver.start({ id: `template-${id}`, stateDir: vmDir.dir, launch })
      await vm.waitForMarker('init', options.bootTimeoutMs ?? 60_000)
      await waitForIdentityWait(vmDir.controlSocket, Math.max(1000, (options.bootTimeoutMs ?? 60_000) - (Date.now() - t0)))
      const bootMs = Date.now() - t0
      const t1 = Date.now()
      await vm.pause()
      await vm.monitor('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] })
      // QEMU 7.2 has no file: transport (it came in 8.2); exec: runs the command with /bin/sh.
      await vm.monitor('migrate', { uri: `exec:cat > ${shellQuote(statePath)}` })
      await waitForMigration(vm, 30_000)
      const saveMs = Date.now() - t1
      await endVm(vm)
      const record: TemplateRecord = { version: 1, id, ready: 'init', launch: options.launch, memoryPath, statePath, createdAt: new Date().toISOString(), timings: { bootMs, saveMs } }
      await writeFileAtomic(join(dir, 'template.json'), JSON.stringify(record, null, 2) + '\n')
      await rm(vmDir.dir, { recursive: true, force: true })
      return new Template(dir, record)
    } catch (err) {
      const console = vm !== undefined ? (await vm.readConsole({ tailBytes: 1500 }).catch(() => '')).trim() : ''
      if (vm !== undefined) { vm.kill(); await vm.exited }
      await rm(dir, { recursive: true, force: true })
      await rm(memoryPath, { force: true })
      throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', `cannot make template ${id}: ${(err as Error).message}${console !== '' ? `; console: ${console.split('\n').slice(-5).join(' | ')}` : ''}`, { cause: err })
    }
  }

  /** Opens a template made earlier, from its template.json. Throws UIG_ERR_TEMPLATE_NOT_FOUND. */
  static async open (dataDir: string, id: string): Promise<Template> {
    const dir = Template.dirOf(dataDir, id)
    try {
      const record = JSON.parse(await readFile(join(dir, 'template.json'), 'utf8')) as TemplateRecord
      if (record.version !== 1 || record.id !== id) throw new Error('unexpected content')
      return new Template(dir, record)
    } catch (err) {
      throw new UigniterError('UIG_ERR_TEMPLATE_NOT_FOUND', `no usable template "${id}" in ${dir}: ${(err as Error).message}`, { cause: err })
    }
  }

  /**
   * Starts a clone: QEMU with the template's launch but the RAM file mapped
   * private and `-incoming defer`, restores the device state, resumes it, and
   * gives the guest its identity over the control channel. A clone whose
   * restore or identity fails within its deadline is killed and the error
   * thrown (UIG_ERR_CLONE_RESTORE, UIG_ERR_CLONE_IDENTITY).
   */
  async clone (driver: QemuDriver, options: CloneOptions): Promise<CloneResult> {
    const mac = (options.mac ?? (options.network.mode !== 'none' ? options.network.mac : undefined) ?? randomMac()).toLowerCase()
    const envArgs = Object.entries(options.env ?? {}).map(([key, value]) => {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new UigniterError('UIG_ERR_CLONE_IDENTITY', `invalid environment variable name "${key}"`)
      return `env=${key}=${encodeParam(value)}`
    })
    if (envArgs.length > MAX_IDENTITY_ENV) throw new UigniterError('UIG_ERR_CLONE_IDENTITY', `a clone takes at most ${MAX_IDENTITY_ENV} environment variables, not ${envArgs.length}`)
    const network = withGuestAddress(options.network, options.guestNetwork.address)
    const t0 = Date.now()
    const vm = await driver.start({
      id: options.id,
      stateDir: options.stateDir,
      launch: { ...this.record.launch, network, memory: { path: this.record.memoryPath, share: false }, incoming: 'defer' }
    })
    const spawnMs = Date.now() - t0
    let restoreMs = 0
    try {
      try {
        const restoreTimeout = options.restoreTimeoutMs ?? 5000
        await vm.monitor('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] })
        await vm.monitor('migrate-incoming', { uri: `exec:cat ${shellQuote(this.record.statePath)}` })
        await waitForMigration(vm, restoreTimeout)
        // Without -S QEMU resumes by itself once the state is in; otherwise we do.
        if ((await vm.status()).status !== 'running') await vm.resume()
        restoreMs = Date.now() - t0
      } catch (err) {
        throw new UigniterError('UIG_ERR_CLONE_RESTORE', `clone ${options.id} could not restore template ${this.id}: ${(err as Error).message}`, { cause: err })
      }
      const identityTimeout = options.identityTimeoutMs ?? 5000
      const deadline = Date.now() + identityTimeout
      let channel: ControlChannel | undefined
      try {
        channel = await ControlChannel.connect(new VmStateDir(options.stateDir).controlSocket, identityTimeout)
        const { address, prefix, gateway } = options.guestNetwork
        await channel.request(['identity', ...envArgs].join(' '), {
          ip: `${address}/${prefix}`,
          ...(gateway !== undefined ? { gw: gateway } : {}),
          mac,
          hostname: options.hostname,
          seed: randomBytes(32).toString('hex'),
          time: Date.now()
        }, Math.max(1, deadline - Date.now()))
      } catch (err) {
        throw new UigniterError('UIG_ERR_CLONE_IDENTITY', `clone ${options.id} did not take its identity within ${identityTimeout} ms: ${(err as Error).message}`, { cause: err })
      } finally {
        channel?.close()
      }
      return {
        vm,
        identity: { address: options.guestNetwork.address, mac, hostname: options.hostname },
        timings: { spawnMs, restoreMs, identityMs: Date.now() - t0 }
      }
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

/**
 * The init answers `status` with `"app":"waiting"` once it holds the app
 * back; its first answer also proves it serves the control channel. The
 * channel is closed again before the snapshot, so that each clone's host
 * connection is news to its guest.
 */
async function waitForIdentityWait (socket: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  const channel = await ControlChannel.connect(socket, timeoutMs)
  try {
    for (;;) {
      const reply = await channel.request('status', {}, Math.max(1, deadline - Date.now()))
      if (reply.app === 'waiting') return
      if (reply.app !== 'running' || Date.now() > deadline) {
        throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', `the guest init does not wait for an identity (its app is ${String(reply.app)}): the image's init is older than uigniter.wait support; rebuild the image`)
      }
      await sleep(20)
    }
  } finally {
    channel.close()
  }
}

/** Polls `query-migrate` until the migration (either side) has completed; throws when it failed. */
async function waitForMigration (vm: QemuVm, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const info = await vm.monitor<{ status?: string, 'error-desc'?: string }>('query-migrate', undefined, { timeoutMs: Math.max(1, deadline - Date.now()) })
    if (info.status === 'completed') return
    if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`the migration ${info.status}${info['error-desc'] !== undefined ? `: ${info['error-desc']}` : ''}`)
    if (Date.now() > deadline) throw new Error(`the migration did not complete within ${timeoutMs} ms (status ${info.status ?? 'none'})`)
    await sleep(5)
  }
}

/** The template VM is paused after its migration and cannot shut down as a guest: QMP quit, then SIGKILL. */
async function endVm (vm: QemuVm): Promise<void> {
  await vm.monitor('quit').catch(() => {})
  const ended = await Promise.race([vm.exited.then(() => true), sleep(3000).then(() => false)])
  if (!ended) {
    vm.kill()
    await vm.exited
  }
}

/** QEMU's user-mode forwards go to 10.0.2.15 unless told otherwise; a clone may have another address. */
function withGuestAddress (network: LaunchNetwork, address: string): LaunchNetwork {
  if (network.mode !== 'user') return network
  return { ...network, forwards: network.forwards.map((f) => ({ ...f, guestAddress: f.guestAddress ?? address })) }
}

/** A random unicast, locally administered MAC. */
function randomMac (): string {
  const b = randomBytes(6)
  b[0] = ((b[0] ?? 0) & 0xfc) | 0x02
  return [...b].map((x) => x.toString(16).padStart(2, '0')).join(':')
}

function shellQuote (value: string): string {
  return `'${value.replaceAll('\'', '\'\\\'\'')}'`
}

async function onTmpfs (path: string): Promise<boolean> {
  try {
    return (await statfs(path)).type === TMPFS_MAGIC
  } catch {
    return false
  }
}
