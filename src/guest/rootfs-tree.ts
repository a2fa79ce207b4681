import { lstat, readdir, readlink } from 'node:fs/promises'
import { join, posix } from 'node:path'
import { UigniterError, hasErrno } from '../core/errors.js'

/** A file's owner in the guest; absent: root's. */
export interface Owner { uid: number, gid: number }

export type TreeEntry =
  | { type: 'dir', mode: number, owner?: Owner }
  | { type: 'file', mode: number, source: { hostPath: string } | { data: Buffer }, size: number, owner?: Owner }
  | { type: 'symlink', target: string, owner?: Owner }

/**
 * The file tree of a guest root file system, described before it is written
 * out as a cpio archive or a disk. Keys are absolute guest paths. Parent
 * directories are created implicitly; a later entry replaces an earlier one,
 * which is how the builder overrides files of a user's rootfs (/etc/resolv.conf).
 */
export class RootfsTree {
  readonly #entries = new Map<string, TreeEntry>()
  /** True once an entry has an owner other than root: the writers keep owners then. */
  #owners = false
  /** True once a host directory was added with its owners kept: its files' capabilities are kept too, whoever owns them. */
  #capabilities = false

  constructor () {
    this.#entries.set('/', { type: 'dir', mode: 0o755 })
  }

  addDirectory (path: string, mode = 0o755): void {
    this.#put(path, { type: 'dir', mode })
  }

  addFile (path: string, source: { hostPath: string, size: number } | { data: Buffer }, mode = 0o644): void {
    const size = 'data' in source ? source.data.length : source.size
    this.#put(path, { type: 'file', mode, source: 'data' in source ? { data: source.data } : { hostPath: source.hostPath }, size })
  }

  addSymlink (path: string, target: string): void {
    this.#put(path, { type: 'symlink', target })
  }

  get keepsOwners (): boolean { return this.#owners }
  get keepsCapabilities (): boolean { return this.#capabilities }

  has (path: string): boolean {
    return this.#entries.has(posix.normalize(path))
  }

  /**
   * Copies a host directory into the tree at `guestDir`: directories, regular
   * files (by reference, read when written out) and symlinks as they are.
   * Devices, sockets and fifos are skipped: an image has no use for them.
   */
  async addHostDirectory (hostDir: string, guestDir: string, options: { owners?: boolean } = {}): Promise<void> {
    let names: string[]
    try {
      names = await readdir(hostDir)
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) throw new UigniterError('UIG_ERR_IMAGE_PATH_NOT_FOUND', `${hostDir} does not exist`, { cause: err })
      throw new UigniterError('UIG_ERR_IMAGE_PATH_UNREADABLE', `cannot read directory ${hostDir}: ${(err as Error).message}`, { cause: err })
    }
    const self = await lstat(hostDir)
    this.addDirectory(guestDir, (self.mode & 0o7777) || 0o755)
    if (options.owners === true) {
      this.#own(guestDir, self)
      // An image whose files are all root's may still hold a capable binary (ping's cap_net_raw).
      this.#capabilities = true
    }
    for (const name of names.sort()) {
      const host = join(hostDir, name)
      const guest = posix.join(guestDir, name)
      const info = await lstat(host)
      if (info.isDirectory()) await this.addHostDirectory(host, guest, options)
      else if (info.isSymbolicLink()) this.addSymlink(guest, await readlink(host))
      else if (info.isFile()) this.addFile(guest, { hostPath: host, size: info.size }, info.mode & 0o7777)
      else continue
      if (options.owners === true && !info.isDirectory()) this.#own(guest, info)
    }
  }

  /** Entries sorted so that every directory comes before what it holds. */
  entries (): Array<[string, TreeEntry]> {
    return [...this.#entries].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
  }

  /** Bytes of file content, the measure the builder uses to pick a format. */
  contentSize (): number {
    let total = 0
    for (const entry of this.#entries.values()) if (entry.type === 'file') total += entry.size
    return total
  }

  #own (path: string, info: { uid: number, gid: number }): void {
    const entry = this.#entries.get(posix.normalize(path))
    if (entry === undefined || (info.uid === 0 && info.gid === 0)) return
    entry.owner = { uid: info.uid, gid: info.gid }
    this.#owners = true
  }

  #put (path: string, entry: TreeEntry): void {
    if (!path.startsWith('/')) throw new Error(`guest path must be absolute: ${path}`)
    const normal = posix.normalize(path)
    for (let dir = posix.dirname(normal); dir !== '/'; dir = posix.dirname(dir)) {
      const existing = this.#entries.get(dir)
      if (existing === undefined || existing.type === 'file') this.#entries.set(dir, { type: 'dir', mode: 0o755 })
    }
    this.#entries.set(normal, entry)
  }
}
