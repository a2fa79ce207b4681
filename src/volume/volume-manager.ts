import { randomBytes } from 'node:crypto'
import { EventEmitter } from 'node:events'
import { mkdir, open, readdir, rename, rm, stat, truncate, writeFile, type FileHandle } from 'node:fs/promises'
import { join, posix } from 'node:path'
import { UigniterError, hasErrno } from '../core/errors.js'
import { run } from '../core/exec.js'
import type { Logger } from '../core/logger.js'
import type { StateStore } from '../core/ports/state-store.js'
import type { GuestVolume } from '../core/ports/vmm-driver.js'
import type { Vm, VmState } from '../core/vm.js'
import {
  VOLUME_NAME, replicaVolumeName,
  type ServiceVolume, type Volume, type VolumeAttachment, type VolumeCreateRequest, type VolumeEvent, type VolumeMount, type VolumeRecord
} from '../core/volume.js'

/** What the API and the CLI's daemon routes need of the volumes ('volume' events carry a VolumeEvent). */
export interface VolumesApi extends EventEmitter {
  create: (request: VolumeCreateRequest) => Promise<Volume>
  list: () => Promise<Volume[]>
  get: (name: string) => Promise<Volume>
  remove: (name: string) => Promise<void>
}

export interface VolumeManagerDeps {
  dataDir: string
  store: StateStore
  log: Logger
  /** The cluster node this daemon is (a cluster only): its volumes carry its name. */
  node?: string
}

/** The VM states in which a VM holds its volumes: from its record's insertion to its end. */
const HOLDING: VmState[] = ['starting', 'running', 'paused', 'stopping']
const MIB = 1024 * 1024

/**
 * The volumes of this host: each a sparse file under `<dataDir>/volumes`
 * holding an ext4 filesystem, and a record in the state store. Which VMs
 * hold a volume is read from the live VMs' records, the one truth the VM
 * manager writes, so that a crash can never leave a volume marked attached
 * to nothing. `checkAttach` is synchronous so that the VM manager can check
 * and insert the VM's record in one turn of the event loop: two creates
 * cannot both take one read-write volume.
 */
export class VolumeManager extends EventEmitter implements VolumesApi {
  readonly #deps: VolumeManagerDeps
  readonly #dir: string
  /** Names being made: a second create of one name waits for nothing, it fails. */
  readonly #making = new Set<string>()
  /** The (VM, volume) pairs whose attachment was announced, so that each is announced once each way. */
  readonly #announced = new Set<string>()

  constructor (deps: VolumeManagerDeps) {
    super()
    this.#deps = deps
    this.#dir = join(deps.dataDir, 'volumes')
  }

  /** After a (re)start: removes the half-made files a crash in the middle of a create left. */
  async recover (): Promise<void> {
    await mkdir(this.#dir, { recursive: true, mode: 0o700 })
    for (const name of await readdir(this.#dir)) {
      if (name.includes('.making-')) await rm(join(this.#dir, name), { force: true })
    }
    for (const vm of this.#deps.store.listVms({ state: HOLDING })) {
      for (const mount of vm.volumes ?? []) this.#announced.add(`${vm.id}/${mount.name}`)
    }
  }

  /** The file that holds a volume. */
  pathOf (name: string): string {
    return join(this.#dir, `${name}.ext4`)
  }

  async create (request: VolumeCreateRequest, service: VolumeRecord['service'] = null): Promise<Volume> {
    const { name, sizeMiB } = request
    if (!VOLUME_NAME.test(name)) throw new UigniterError('UIG_ERR_VOLUME_INVALID', `invalid volume name "${name}": use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, at most 63 characters`)
    if (!Number.isInteger(sizeMiB) || sizeMiB < 16) throw new UigniterError('UIG_ERR_VOLUME_INVALID', `a volume needs a size of at least 16 MiB (got ${sizeMiB})`)
    if (this.#deps.store.findVolume(name) !== undefined || this.#making.has(name)) {
      throw new UigniterError('UIG_ERR_VOLUME_EXISTS', `a volume named "${name}" exists already; choose another name, or remove it first`)
    }
    this.#making.add(name)
    const making = join(this.#dir, `${name}.ext4.making-${randomBytes(4).toString('hex')}`)
    try {
      await mkdir(this.#dir, { recursive: true, mode: 0o700 })
      // A sparse file: the filesystem's metadata is all it costs until the guest writes.
      await writeFile(making, '', { mode: 0o600, flag: 'wx' })
      await truncate(making, sizeMiB * MIB)
      // assume_storage_prezeroed: a new sparse file reads as zeros, so neither mkfs nor the guest's
      // kernel (lazy init) writes the inode tables out, which would allocate them on the host.
      await run('mkfs.ext4', ['-q', '-F', '-m', '0', '-L', name.slice(0, 16), '-E', 'assume_storage_prezeroed=1', making], {
        onFail: (r) => new UigniterError(/No space/i.test(r.stderr) ? 'UIG_ERR_NO_SPACE' : 'UIG_ERR_VOLUME_CREATE_FAILED', `mkfs.ext4 could not make volume ${name}: ${r.stderr.trim()}`)
      })
      const record: VolumeRecord = { name, sizeMiB, fs: 'ext4', labels: request.labels ?? {}, service, createdAt: new Date().toISOString() }
      this.#deps.store.insertVolume(record)
      await rename(making, this.pathOf(name))
      this.#event('volume.created', name, `volume ${name} created (${sizeMiB} MiB, ext4)`)
      return await this.#describe(record, new Map())
    } catch (err) {
      await rm(making, { force: true })
      if (hasErrno(err, 'ENOSPC')) throw new UigniterError('UIG_ERR_NO_SPACE', `no space left to make volume ${name} in ${this.#dir}`, { cause: err })
      if (err instanceof UigniterError) throw err
      throw new UigniterError('UIG_ERR_VOLUME_CREATE_FAILED', `cannot make volume ${name} in ${this.#dir}: ${(err as Error).message}`, { cause: err })
    } finally {
      this.#making.delete(name)
    }
  }

  async list (): Promise<Volume[]> {
    const holders = this.#holders()
    return await Promise.all(this.#deps.store.listVolumes().map(async (record) => await this.#describe(record, holders)))
  }

  /** The volumes' records only: no file is read (what the cluster is told of this node's volumes). */
  records (): VolumeRecord[] {
    return this.#deps.store.listVolumes()
  }

  async get (name: string): Promise<Volume> {
    return await this.#describe(this.#record(name), this.#holders())
  }

  /** Deletes a volume and its data; refused while a live VM holds it. */
  async remove (name: string): Promise<void> {
    const record = this.#record(name)
    const holders = this.#holders().get(name) ?? []
    if (holders.length > 0) {
      throw new UigniterError('UIG_ERR_VOLUME_IN_USE', `volume ${name} is attached to ${holders.map((a) => a.vmName).join(', ')}; stop ${holders.length === 1 ? 'that VM' : 'those VMs'} (or its service) first`)
    }
    this.#deps.store.deleteVolume(record.name)
    await rm(this.pathOf(record.name), { force: true })
    this.#event('volume.deleted', name, `volume ${name} deleted`)
  }

  /**
   * Checks that a VM may take these volumes and gives their devices. Every
   * volume must exist; a read-write one must be held by no live VM, a
   * read-only one by no VM that writes it (ext4 mounted read-write in one
   * guest reads as garbage in another). Synchronous: see the class comment.
   */
  checkAttach (mounts: VolumeMount[]): GuestVolume[] {
    const paths = new Set<string>()
    const names = new Set<string>()
    const held = mounts.length > 0 ? this.#holders() : new Map<string, VolumeAttachment[]>()
    return mounts.map((mount) => {
      const path = mount.guestPath.replace(/\/+$/, '')
      if (path === '' || posix.normalize(path) !== path) {
        throw new UigniterError('UIG_ERR_VOLUME_INVALID', `guest path "${mount.guestPath}" of volume ${mount.name} must be a normalized absolute path other than "/", such as /data`)
      }
      if (paths.has(path)) throw new UigniterError('UIG_ERR_VOLUME_INVALID', `two volumes are mounted on ${path}; give each its own path`)
      if (names.has(mount.name)) throw new UigniterError('UIG_ERR_VOLUME_INVALID', `volume ${mount.name} is attached twice to one VM`)
      paths.add(path)
      names.add(mount.name)
      this.#record(mount.name)
      const holders = held.get(mount.name) ?? []
      const writers = holders.filter((a) => !a.readOnly)
      if (!mount.readOnly && holders.length > 0) {
        throw new UigniterError('UIG_ERR_VOLUME_IN_USE', `volume ${mount.name} is attached to ${holders.map((a) => a.vmName).join(', ')}: a read-write volume can be attached to one VM only; stop that VM first, or attach it read-only (:ro) everywhere`)
      }
      if (writers.length > 0) {
        throw new UigniterError('UIG_ERR_VOLUME_IN_USE', `volume ${mount.name} is attached read-write to ${writers[0]?.vmName ?? '?'}: it cannot be attached read-only elsewhere while that VM writes it`)
      }
      return { hostPath: this.pathOf(mount.name), guestPath: path, readOnly: mount.readOnly }
    })
  }

  /**
   * The mounts of a service replica's volumes: its own per-replica volumes
   * (made on the first start of its index, `SERVICE-NAME-INDEX`) and the
   * shared read-only ones.
   */
  async replicaMounts (service: string, volumes: ServiceVolume[], index: number): Promise<VolumeMount[]> {
    const mounts: VolumeMount[] = []
    for (const volume of volumes) {
      if (!volume.perReplica) {
        mounts.push({ name: volume.name, guestPath: volume.guestPath, readOnly: true })
        continue
      }
      const name = replicaVolumeName(service, volume.name, index)
      if (this.#deps.store.findVolume(name) === undefined) {
        await this.create({ name, sizeMiB: volume.sizeMiB ?? 1024, fs: 'ext4', labels: {} }, { name: service, volume: volume.name, index })
      }
      mounts.push({ name, guestPath: volume.guestPath, readOnly: volume.readOnly ?? false })
    }
    return mounts
  }

  /** The VM manager's record of a VM changed: its volumes' attached and detached events. */
  vmChanged (vm: Vm): void {
    const holding = HOLDING.includes(vm.state)
    for (const mount of vm.volumes ?? []) {
      const key = `${vm.id}/${mount.name}`
      if (holding && !this.#announced.has(key)) {
        this.#announced.add(key)
        this.#event('volume.attached', mount.name, `volume ${mount.name} attached to ${vm.name} at ${mount.guestPath}${mount.readOnly ? ' (read-only)' : ''}`, vm.name)
      } else if (!holding && this.#announced.delete(key)) {
        this.#event('volume.detached', mount.name, `volume ${mount.name} detached from ${vm.name} (${vm.state})`, vm.name)
      }
    }
  }

  #record (name: string): VolumeRecord {
    const record = this.#deps.store.findVolume(name)
    if (record === undefined) throw new UigniterError('UIG_ERR_VOLUME_NOT_FOUND', `no volume is named "${name}"; "uigniter volume ls" lists them, "uigniter volume create" makes one`)
    return record
  }

  /** Every volume's attachments, from one read of the live VMs. */
  #holders (): Map<string, VolumeAttachment[]> {
    const byVolume = new Map<string, VolumeAttachment[]>()
    for (const vm of this.#deps.store.listVms({ state: HOLDING })) {
      for (const m of vm.volumes ?? []) {
        const list = byVolume.get(m.name) ?? []
        list.push({ vm: vm.id, vmName: vm.name, guestPath: m.guestPath, readOnly: m.readOnly })
        byVolume.set(m.name, list)
      }
    }
    return byVolume
  }

  async #describe (record: VolumeRecord, holders: Map<string, VolumeAttachment[]>): Promise<Volume> {
    const path = this.pathOf(record.name)
    let allocatedBytes = 0
    try {
      allocatedBytes = (await stat(path)).blocks * 512
    } catch (err) {
      if (!hasErrno(err, 'ENOENT')) throw err
      this.#deps.log.warn({ volume: record.name, path }, 'a volume\'s file is missing')
    }
    return {
      name: record.name,
      ...(this.#deps.node !== undefined ? { node: this.#deps.node } : {}),
      sizeMiB: record.sizeMiB,
      fs: record.fs,
      labels: record.labels,
      service: record.service,
      path,
      allocatedBytes,
      usedBytes: await ext4UsedBytes(path, record.sizeMiB * MIB),
      attachments: holders.get(record.name) ?? [],
      createdAt: record.createdAt
    }
  }

  #event (type: VolumeEvent['type'], volume: string, message: string, vm?: string): void {
    this.#deps.log.info({ volume, vm, event: type }, message)
    const event: VolumeEvent = { type, volume, ...(vm !== undefined ? { vm } : {}), message, at: new Date().toISOString() }
    this.emit('volume', event)
  }
}

/**
 * What an ext4 filesystem uses, from its superblock: blocks less free
 * blocks. The guest's kernel writes the free count back at its syncs and at
 * unmount, so a volume in use may be a little behind. The superblock is the
 * guest's writing, so it is read as hostile: a wrong magic, a block size
 * out of range or counts that do not add up give null, never a throw.
 */
export async function ext4UsedBytes (path: string, sizeBytes: number): Promise<number | null> {
  const sb = Buffer.alloc(1024)
  let file: FileHandle | undefined
  try {
    file = await open(path, 'r')
    if ((await file.read(sb, 0, 1024, 1024)).bytesRead !== 1024) return null
  } catch {
    return null
  } finally {
    await file?.close()
  }
  if (sb.readUInt16LE(0x38) !== 0xef53) return null
  const logBlock = sb.readUInt32LE(0x18)
  if (logBlock > 6) return null
  const blockSize = 1024 << logBlock
  const wide = (sb.readUInt32LE(0x60) & 0x80) !== 0
  const blocks = sb.readUInt32LE(0x04) + (wide ? sb.readUInt32LE(0x150) * 2 ** 32 : 0)
  const free = sb.readUInt32LE(0x0c) + (wide ? sb.readUInt32LE(0x158) * 2 ** 32 : 0)
  if (free > blocks || blocks * blockSize > sizeBytes) return null
  return (blocks - free) * blockSize
}
