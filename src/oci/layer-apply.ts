import { constants } from 'node:fs'
import { link, lstat, mkdir, open, readdir, rm, symlink, lchown, lutimes } from 'node:fs/promises'
import { basename, join } from 'node:path'
import type tar from 'tar-stream'
import { UigniterError, hasErrno } from '../core/errors.js'
import { layerInvalid, layerTooLarge, layerUnsafe } from './layer-errors.js'
import { entryComponents } from './layer-path.js'
import { openLayerStream } from './layer-stream.js'
import { createLayerExtract, rawXattrsOf, type TarEntry } from './layer-tar-reader.js'
import { setXattrOnFd } from './layer-xattr.js'

export interface LayerFile {
  /** The layer blob on the host (already verified against its digest). */
  path: string
  /** Its OCI or Docker media type: tar, tar+gzip or tar+zstd. */
  mediaType: string
  /** Named in errors; the file's name when absent. */
  digest?: string
}

export interface LayerLimits {
  /** Largest regular file, in bytes. */
  maxEntryBytes: number
  /** All regular files of all layers together, in bytes (a decompression bomb stops here). */
  maxTotalBytes: number
  /** Entries of all layers together. */
  maxEntries: number
}

export const defaultLayerLimits: Readonly<LayerLimits> = Object.freeze({
  maxEntryBytes: 8 * 1024 ** 3,
  maxTotalBytes: 32 * 1024 ** 3,
  maxEntries: 2_000_000
})

export interface ApplyResult {
  /** Regular files written (hard links not included). */
  files: number
  /** Bytes of the regular files written. */
  bytes: number
  dirs: number
  symlinks: number
  hardlinks: number
  whiteouts: number
  /** Files given their `security.capability`. */
  capabilities: number
  skipped: {
    /** Character and block devices: a guest gets its /dev from devtmpfs. */
    devices: number
    fifos: number
    /** Xattrs other than security.capability (user.*, trusted.*, security.selinux), not applied. */
    xattrs: number
  }
}

const OPAQUE = '.wh..wh..opq'
const WHITEOUT = '.wh.'
const CAPABILITY = 'security.capability'
const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_RDONLY, O_DIRECTORY } = constants

/**
 * Applies image layers, in order, onto the empty directory `root`, as an
 * overlay would show them: whiteouts and opaque directories hide what lower
 * layers put there; files, directories, symlinks and hard links keep their
 * mode (setuid, setgid, sticky included), owner and mtime; a file's
 * `security.capability` is set again. Device nodes and fifos are skipped and
 * counted. Needs root, for the owners.
 *
 * Layers are untrusted: an entry that would escape `root` ("..", an absolute
 * name, a write through a symlink, a hard link to something not in the tree),
 * an entry or a total past `limits`, or a tar that does not parse is refused
 * with a LayerError (see layer-errors.ts for its code and `reason`). Nothing
 * outside `root` is ever written: no path is opened through a symlink, and a
 * layer that writes below a symlink is refused even when it points inside
 * the tree (layers made by diffing trees, as every builder does, never do).
 * On any error `root` is left partly written: the caller deletes it.
 *
 * @example
 * const { files, bytes } = await applyLayers([{ path: '/cache/sha256-ab…', mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip' }], '/tmp/rootfs')
 */
export async function applyLayers (layers: LayerFile[], root: string, limits: Partial<LayerLimits> = {}): Promise<ApplyResult> {
  const applier = new TreeWriter(root, { ...defaultLayerLimits, ...limits })
  await applier.checkEmpty()
  for (const layer of layers) await applier.applyLayer(layer)
  await applier.finish()
  return applier.result
}

class TreeWriter {
  readonly result: ApplyResult = { files: 0, bytes: 0, dirs: 0, symlinks: 0, hardlinks: 0, whiteouts: 0, capabilities: 0, skipped: { devices: 0, fifos: 0, xattrs: 0 } }
  private entries = 0
  /** Directory mtimes, set once every layer is in: a child written later would bump them. */
  private readonly dirTimes = new Map<string, Date>()
  /** Paths this layer wrote (with the parents it made): its own whiteouts and opaque dirs do not hide them. */
  private written = new Set<string>()
  private layerName = ''

  constructor (private readonly root: string, private readonly limits: LayerLimits) {}

  async checkEmpty (): Promise<void> {
    await mkdir(this.root, { recursive: true })
    if ((await readdir(this.root)).length > 0) throw new UigniterError('UIG_ERR_INTERNAL', `layers are applied onto an empty directory; ${this.root} is not empty`)
  }

  async applyLayer (layer: LayerFile): Promise<void> {
    this.layerName = layer.digest ?? basename(layer.path)
    this.written = new Set()
    const source = openLayerStream(layer.path, layer.mediaType)
    const extract = createLayerExtract()
    source.stream.on('error', (err) => extract.destroy(err))
    source.stream.pipe(extract.sink)
    try {
      for await (const entry of extract.entries) await this.applyEntry(entry)
      await source.done
    } catch (err) {
      throw this.asLayerError(err)
    } finally {
      source.destroy()
      extract.destroy()
    }
  }

  async finish (): Promise<void> {
    const deepestFirst = [...this.dirTimes].sort((a, b) => b[0].split('/').length - a[0].split('/').length)
    for (const [rel, mtime] of deepestFirst) {
      const fh = await this.openDir(rel).catch((err: unknown) => { if (hasErrno(err, 'ENOENT', 'ENOTDIR', 'ELOOP')) return null; throw err })
      if (fh === null) continue
      try { await fh.utimes(mtime, mtime) } finally { await fh.close() }
    }
  }

  private asLayerError (err: unknown): unknown {
    if (err instanceof UigniterError) return err
    if (hasErrno(err, 'ENOSPC')) return new UigniterError('UIG_ERR_NO_SPACE', `no space left while applying layer ${this.layerName} into ${this.root}`, { cause: err })
    // File-system errors of our own writes keep their errno; the rest come from the tar or the decompressor.
    if (typeof err === 'object' && err !== null && 'syscall' in err) return err
    return layerInvalid(this.layerName, err instanceof Error ? err.message : String(err), err)
  }

  private async applyEntry (entry: TarEntry): Promise<void> {
    const header = entry.header
    if (++this.entries > this.limits.maxEntries) throw layerTooLarge(this.layerName, `more than ${this.limits.maxEntries} entries`)
    const parts = entryComponents(header.name)
    if (!Array.isArray(parts)) throw layerUnsafe(this.layerName, header.name, parts.refused)
    const name = parts.at(-1)
    if (name === undefined) return await this.applyRootEntry(entry)
    if (name.startsWith(WHITEOUT)) return await this.applyWhiteout(entry, parts)
    switch (header.type) {
      case 'file':
      case 'contiguous-file':
        return await this.writeFile(entry, parts)
      case 'directory':
        return await this.writeDir(entry, parts)
      case 'symlink':
        return await this.writeSymlink(entry, parts)
      case 'link':
        return await this.writeHardlink(entry, parts)
      case 'character-device':
      case 'block-device':
        this.result.skipped.devices++
        return await drain(entry)
      case 'fifo':
        this.result.skipped.fifos++
        return await drain(entry)
      default:
        throw layerInvalid(this.layerName, `entry "${header.name}" has a type uigniter does not apply (${String(header.type)})`)
    }
  }

  private async applyRootEntry (entry: TarEntry): Promise<void> {
    await drain(entry)
    if (entry.header.type !== 'directory') throw layerInvalid(this.layerName, `entry "${entry.header.name}" names the root but is not a directory`)
    await this.setDirMeta('', entry.header)
  }

  private async applyWhiteout (entry: TarEntry, parts: string[]): Promise<void> {
    await drain(entry)
    const name = parts.at(-1) as string
    const dirParts = parts.slice(0, -1)
    this.result.whiteouts++
    if (name === OPAQUE) {
      await this.ensureParents([...dirParts, OPAQUE], entry.header.name)
      await this.clearOpaque(dirParts)
      return
    }
    const hidden = name.slice(WHITEOUT.length)
    if (hidden === '' || hidden === '.' || hidden === '..') throw layerInvalid(this.layerName, `entry "${entry.header.name}" is a whiteout that names no file`)
    if (!await this.parentsExist(parts, entry.header.name)) return
    const rel = [...dirParts, hidden].join('/')
    if (this.written.has(rel)) return
    await this.remove(rel)
  }

  /** Removes what lower layers left in the directory; what this layer wrote there stays. */
  private async clearOpaque (dirParts: string[]): Promise<void> {
    const dirRel = dirParts.join('/')
    for (const child of await readdir(join(this.root, dirRel))) {
      const rel = dirRel === '' ? child : `${dirRel}/${child}`
      if (!this.written.has(rel)) { await this.remove(rel); continue }
      const st = await lstat(join(this.root, rel))
      if (st.isDirectory()) await this.clearOpaque([...dirParts, child])
    }
  }

  private async writeFile (entry: TarEntry, parts: string[]): Promise<void> {
    const header = entry.header
    const size = header.size ?? 0
    if (size > this.limits.maxEntryBytes) throw layerTooLarge(this.layerName, `entry "${header.name}" has ${size} bytes, past the limit of ${this.limits.maxEntryBytes}`)
    if (this.result.bytes + size > this.limits.maxTotalBytes) throw layerTooLarge(this.layerName, `the layers hold more than ${this.limits.maxTotalBytes} bytes of files`)
    const rel = await this.prepare(parts, header.name)
    // O_EXCL|O_NOFOLLOW: the name was just removed, so anything there now was not made by us.
    const fh = await open(join(this.root, rel), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600)
    try {
      let written = 0
      try {
        for await (const chunk of entry) {
          written += chunk.length
          await fh.write(chunk)
        }
      } catch (err) {
        if (err instanceof UigniterError || (typeof err === 'object' && err !== null && 'syscall' in err)) throw err
        throw layerInvalid(this.layerName, `the layer ends inside entry "${header.name}" (${written} of its ${size} bytes): it is truncated or not a tar`, err)
      }
      this.result.bytes += written
      // chown clears setuid/setgid and capabilities, so it goes first.
      await fh.chown(header.uid ?? 0, header.gid ?? 0)
      await fh.chmod((header.mode ?? 0o644) & 0o7777)
      await this.applyXattrs(fh.fd, header)
      const mtime = header.mtime ?? new Date(0)
      await fh.utimes(mtime, mtime)
    } finally {
      await fh.close()
    }
    this.result.files++
  }

  private async applyXattrs (fd: number, header: tar.Header): Promise<void> {
    for (const [name, value] of rawXattrsOf(header)) {
      if (name !== CAPABILITY) { this.result.skipped.xattrs++; continue }
      await setXattrOnFd(fd, name, value)
      this.result.capabilities++
    }
  }

  private async writeDir (entry: TarEntry, parts: string[]): Promise<void> {
    await drain(entry)
    const rel = parts.join('/')
    await this.ensureParents(parts, entry.header.name)
    const st = await lstatOrNull(join(this.root, rel))
    if (st !== null && !st.isDirectory()) await this.remove(rel)
    if (st === null || !st.isDirectory()) await mkdir(join(this.root, rel), 0o700)
    this.written.add(rel)
    await this.setDirMeta(rel, entry.header)
    this.result.dirs++
  }

  private async setDirMeta (rel: string, header: tar.Header): Promise<void> {
    const fh = await this.openDir(rel)
    try {
      await fh.chown(header.uid ?? 0, header.gid ?? 0)
      await fh.chmod((header.mode ?? 0o755) & 0o7777)
    } finally {
      await fh.close()
    }
    this.dirTimes.set(rel, header.mtime ?? new Date(0))
  }

  private async openDir (rel: string): Promise<Awaited<ReturnType<typeof open>>> {
    return await open(join(this.root, rel), O_RDONLY | O_DIRECTORY | O_NOFOLLOW)
  }

  private async writeSymlink (entry: TarEntry, parts: string[]): Promise<void> {
    await drain(entry)
    const header = entry.header
    const target = header.linkname ?? ''
    if (target === '' || target.includes('\0')) throw layerInvalid(this.layerName, `symlink "${header.name}" has no usable target`)
    // Its target is not checked: the guest resolves it inside its own root, and nothing here writes through it.
    const rel = await this.prepare(parts, header.name)
    const path = join(this.root, rel)
    await symlink(target, path)
    await lchown(path, header.uid ?? 0, header.gid ?? 0)
    const mtime = header.mtime ?? new Date(0)
    await lutimes(path, mtime, mtime)
    this.result.symlinks++
  }

  private async writeHardlink (entry: TarEntry, parts: string[]): Promise<void> {
    await drain(entry)
    const header = entry.header
    const targetParts = entryComponents(header.linkname ?? '')
    if (!Array.isArray(targetParts)) throw layerUnsafe(this.layerName, header.name, `is a hard link whose target ${targetParts.refused}`)
    if (targetParts.length === 0) throw layerInvalid(this.layerName, `hard link "${header.name}" names no target`)
    if (!await this.parentsExist(targetParts, header.name)) throw layerInvalid(this.layerName, `hard link "${header.name}" points to "${header.linkname ?? ''}", which is not in the tree`)
    const targetPath = join(this.root, ...targetParts)
    const target = await lstatOrNull(targetPath)
    if (target === null) throw layerInvalid(this.layerName, `hard link "${header.name}" points to "${header.linkname ?? ''}", which is not in the tree`)
    if (!target.isFile() && !target.isSymbolicLink()) throw layerInvalid(this.layerName, `hard link "${header.name}" points to "${header.linkname ?? ''}", which is not a file`)
    const rel = parts.join('/')
    const existing = await lstatOrNull(join(this.root, rel))
    if (existing !== null && existing.ino === target.ino && existing.dev === target.dev) { this.written.add(rel); return }
    await this.prepare(parts, header.name)
    // link(2) without AT_SYMLINK_FOLLOW: a target that is a symlink is linked itself, never followed.
    await link(targetPath, join(this.root, rel))
    this.result.hardlinks++
  }

  /** Makes the parents, clears the name, and marks it written; returns its path relative to the root. */
  private async prepare (parts: string[], entryName: string): Promise<string> {
    await this.ensureParents(parts, entryName)
    const rel = parts.join('/')
    await this.remove(rel)
    this.written.add(rel)
    return rel
  }

  /**
   * Walks the parents of `parts` with lstat, making the missing ones. A parent
   * that is a symlink is refused: writing below it would follow it, maybe out
   * of the root. A parent that is a file is replaced by a directory, as the
   * layer's content says.
   */
  private async ensureParents (parts: string[], entryName: string): Promise<void> {
    for (let i = 1; i < parts.length; i++) {
      const rel = parts.slice(0, i).join('/')
      const st = await lstatOrNull(join(this.root, rel))
      if (st?.isDirectory() === true) continue
      if (st?.isSymbolicLink() === true) throw layerUnsafe(this.layerName, entryName, `would be written through the symlink "${rel}"`)
      if (st !== null) await this.remove(rel)
      await mkdir(join(this.root, rel), 0o755)
      this.written.add(rel)
    }
  }

  /** Whether every parent of `parts` is a directory (a symlink among them is refused, as in ensureParents). */
  private async parentsExist (parts: string[], entryName: string): Promise<boolean> {
    for (let i = 1; i < parts.length; i++) {
      const rel = parts.slice(0, i).join('/')
      const st = await lstatOrNull(join(this.root, rel))
      if (st === null) return false
      if (st.isSymbolicLink()) throw layerUnsafe(this.layerName, entryName, `would be reached through the symlink "${rel}"`)
      if (!st.isDirectory()) return false
    }
    return true
  }

  /** rm never follows symlinks, at the top or inside a directory it empties. */
  private async remove (rel: string): Promise<void> {
    const st = await lstatOrNull(join(this.root, rel))
    if (st === null) return
    await rm(join(this.root, rel), { recursive: true, force: true })
    if (!st.isDirectory()) return
    for (const key of this.dirTimes.keys()) {
      if (key === rel || key.startsWith(`${rel}/`)) this.dirTimes.delete(key)
    }
  }
}

async function drain (entry: TarEntry): Promise<void> {
  // eslint-disable-next-line @typescript-eslint/no-unused-vars
  for await (const _chunk of entry) { /* metadata-only entries carry no data worth reading */ }
}

async function lstatOrNull (path: string): Promise<Awaited<ReturnType<typeof lstat>> | null> {
  try {
    return await lstat(path)
  } catch (err) {
    if (hasErrno(err, 'ENOENT', 'ENOTDIR')) return null
    throw err
  }
}
