import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { copyFile, mkdir, open, readdir, readFile, rename, rm, rmdir, stat, utimes } from 'node:fs/promises'
import { join } from 'node:path'
import { Value } from '@sinclair/typebox/value'
import { UigniterError, hasErrno, rethrowNoSpace } from '../core/errors.js'
import { writeFileAtomic } from '../core/fs-atomic.js'
import { ImageManifestSchema, formatImageRef, parseImageRef, type ImageManifest } from '../core/image.js'
import type { ImageRepository } from '../core/ports/image-repository.js'

/** sha256 of a file, as `sha256:<hex>`. */
export async function digestFile (path: string): Promise<string> {
  const hash = createHash('sha256')
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer)
  return `sha256:${hash.digest('hex')}`
}

const DIGEST_RE = /^sha256:[0-9a-f]{64}$/

/** True for `sha256:` and 64 lowercase hex digits, the only digests the store names files after. */
export function isDigest (value: string): boolean {
  return DIGEST_RE.test(value)
}

// The digest is of what boots (image-builder.ts hashes the same fields), so the
// same build under another name or at another time has the same digest.
const UNDIGESTED_FIELDS = new Set(['schemaVersion', 'name', 'tag', 'digest', 'size', 'createdAt'])

/**
 * The digest a manifest's content gives: sha256 of the JSON of every field but
 * name, tag, time, size and the digest itself. Key order counts (the builder
 * hashes JSON.stringify), so it holds for a manifest parsed from its stored
 * bytes, not for one rebuilt field by field.
 */
export function manifestContentDigest (manifest: ImageManifest): string {
  const content = Object.fromEntries(Object.entries(manifest).filter(([key]) => !UNDIGESTED_FIELDS.has(key)))
  return `sha256:${createHash('sha256').update(JSON.stringify(content)).digest('hex')}`
}

/**
 * The content-addressed image store under `<dataDir>/images`:
 * - `blobs/sha256/<hex>`: kernels, initramfs archives, disks (immutable);
 * - `manifests/<hex>.json`: one per image digest;
 * - `refs/<name>/<tag>`: the digest that `name:tag` points to;
 * - `tmp/`: work areas of builds in progress, named after the builder's pid.
 * Every write is a rename from a temp name, so a crash or a full disk leaves
 * either the old state or the new one, never a half-written entry.
 */
export class ImageStore implements ImageRepository {
  readonly root: string

  constructor (dataDir: string) {
    this.root = join(dataDir, 'images')
  }

  blobPath (digest: string): string {
    return join(this.root, 'blobs', 'sha256', digest.replace(/^sha256:/, ''))
  }

  /** A fresh work directory for one build; `discardWorkDir` or `gc` removes it. */
  async createWorkDir (): Promise<string> {
    const dir = join(this.root, 'tmp', `build-${process.pid}-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`)
    try {
      await mkdir(dir, { recursive: true })
    } catch (err) { rethrowNoSpace(err, this.root) }
    return dir
  }

  async discardWorkDir (dir: string): Promise<void> {
    await rm(dir, { recursive: true, force: true })
  }

  /**
   * Moves a finished file (inside a work dir, so on the same file system) into
   * the blob store under its digest. An identical blob already there is kept.
   */
  async putBlob (path: string): Promise<{ digest: string; size: number }> {
    const digest = await digestFile(path)
    const { size } = await stat(path)
    const dest = this.blobPath(digest)
    try {
      await mkdir(join(this.root, 'blobs', 'sha256'), { recursive: true })
      await rename(path, dest)
    } catch (err) { rethrowNoSpace(err, this.root) }
    return { digest, size }
  }

  /**
   * Copies a host file (a kernel, a unikernel's disk) into the blob store,
   * unless a blob with its digest is already there; that one is touched so
   * that a concurrent gc sees it as fresh until the manifest commits.
   */
  async importFile (hostPath: string): Promise<{ digest: string; size: number }> {
    const digest = await digestFile(hostPath)
    const dest = this.blobPath(digest)
    try {
      const { size } = await stat(dest)
      const now = new Date()
      await utimes(dest, now, now)
      return { digest, size }
    } catch (err) {
      if (!hasErrno(err, 'ENOENT')) throw err
    }
    const work = await this.createWorkDir()
    try {
      await copyFile(hostPath, join(work, 'blob'))
      return await this.putBlob(join(work, 'blob'))
    } catch (err) {
      rethrowNoSpace(err, this.root)
    } finally {
      await this.discardWorkDir(work)
    }
  }

  /** Writes the manifest, then points `name:tag` at it: the ref is the commit point. */
  async commit (manifest: ImageManifest): Promise<void> {
    const hex = manifest.digest.replace(/^sha256:/, '')
    await writeFileAtomic(join(this.root, 'manifests', `${hex}.json`), JSON.stringify(manifest, null, 2) + '\n')
    await writeFileAtomic(this.#refPath(manifest.name, manifest.tag), manifest.digest + '\n')
  }

  /**
   * Writes the manifest without pointing any ref at it (an image fetched by
   * digest alone). Untagged, the next gc removes it.
   */
  async putManifest (manifest: ImageManifest): Promise<void> {
    await writeFileAtomic(this.#manifestPath(manifest.digest), JSON.stringify(manifest, null, 2) + '\n')
  }

  async hasBlob (digest: string): Promise<boolean> {
    try {
      return (await stat(this.blobPath(digest))).isFile()
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) return false
      throw err
    }
  }

  /** The manifest's stored bytes exactly (a peer hashes them), or undefined when the store lacks it. */
  async manifestBytes (digest: string): Promise<Buffer | undefined> {
    try {
      return await readFile(this.#manifestPath(digest))
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) return undefined
      throw err
    }
  }

  /** The manifest stored under `digest`, tagged or not, or undefined; throws UIG_ERR_IMAGE_STORE_CORRUPT. */
  async getByDigest (digest: string): Promise<ImageManifest | undefined> {
    if (await this.manifestBytes(digest) === undefined) return undefined
    return await this.#readManifest(digest)
  }

  #manifestPath (digest: string): string {
    return join(this.root, 'manifests', `${digest.replace(/^sha256:/, '')}.json`)
  }

  #refPath (name: string, tag: string): string {
    return join(this.root, 'refs', encodeURIComponent(name), tag)
  }

  /** Looks up `name[:tag]`; throws UIG_ERR_IMAGE_NOT_FOUND. */
  async get (ref: string): Promise<ImageManifest> {
    const { name, tag } = parseImageRef(ref)
    let digest: string
    try {
      digest = (await readFile(this.#refPath(name, tag), 'utf8')).trim()
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) {
        throw new UigniterError('UIG_ERR_IMAGE_NOT_FOUND', `image ${name}:${tag} not found; build it with "uigniter image build" or list images with "uigniter image ls"`)
      }
      throw err
    }
    return await this.#readManifest(digest)
  }

  async #readManifest (digest: string): Promise<ImageManifest> {
    const path = join(this.root, 'manifests', `${digest.replace(/^sha256:/, '')}.json`)
    let parsed: unknown
    try {
      parsed = JSON.parse(await readFile(path, 'utf8'))
    } catch (err) {
      throw new UigniterError('UIG_ERR_IMAGE_STORE_CORRUPT', `manifest ${path} cannot be read: ${(err as Error).message}`, { cause: err })
    }
    if (!Value.Check(ImageManifestSchema, parsed)) {
      throw new UigniterError('UIG_ERR_IMAGE_STORE_CORRUPT', `manifest ${path} does not match the manifest schema`)
    }
    return parsed
  }

  /** Every tagged image, sorted by name then tag. */
  async list (): Promise<ImageManifest[]> {
    const out: ImageManifest[] = []
    for (const encoded of await readdirOrEmpty(join(this.root, 'refs'))) {
      for (const tag of await readdirOrEmpty(join(this.root, 'refs', encoded))) {
        if (tag.startsWith('.tmp-')) continue
        out.push(await this.get(formatImageRef({ name: decodeURIComponent(encoded), tag })))
      }
    }
    return out.sort((a, b) => a.name.localeCompare(b.name) || a.tag.localeCompare(b.tag))
  }

  /** Removes the tag, then every manifest and blob no tag reaches any more. */
  async remove (ref: string): Promise<ImageManifest> {
    const manifest = await this.get(ref)
    await rm(this.#refPath(manifest.name, manifest.tag))
    // The name's directory goes when its last tag does; rmdir refuses while other tags remain.
    await rmdir(join(this.root, 'refs', encodeURIComponent(manifest.name))).catch(() => {})
    await this.gc()
    return manifest
  }

  /**
   * Deletes unreferenced manifests and blobs, and the work dirs of builds
   * whose process is gone. Blobs are only moved into the store right before
   * their manifest is committed, so a blob younger than a minute may belong
   * to a build about to commit: those are kept.
   */
  async gc (): Promise<void> {
    const live = await this.list()
    const liveManifests = new Set(live.map((m) => m.digest.replace(/^sha256:/, '')))
    const liveBlobs = new Set(live.flatMap((m) => [m.kernel.blob.digest, m.rootfs?.digest])
      .filter((d): d is string => d !== undefined).map((d) => d.replace(/^sha256:/, '')))
    for (const file of await readdirOrEmpty(join(this.root, 'manifests'))) {
      if (!liveManifests.has(file.replace(/\.json$/, ''))) await rm(join(this.root, 'manifests', file), { force: true })
    }
    const blobDir = join(this.root, 'blobs', 'sha256')
    for (const hex of await readdirOrEmpty(blobDir)) {
      if (liveBlobs.has(hex)) continue
      const info = await stat(join(blobDir, hex)).catch(() => undefined)
      if (info !== undefined && Date.now() - info.mtimeMs > 60_000) await rm(join(blobDir, hex), { force: true })
    }
    for (const work of await readdirOrEmpty(join(this.root, 'tmp'))) {
      const pid = Number(/^build-(\d+)-/.exec(work)?.[1])
      if (!Number.isInteger(pid) || !processAlive(pid)) await rm(join(this.root, 'tmp', work), { recursive: true, force: true })
    }
  }
}

function processAlive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return hasErrno(err, 'EPERM')
  }
}

async function readdirOrEmpty (dir: string): Promise<string[]> {
  try {
    return await readdir(dir)
  } catch (err) {
    if (hasErrno(err, 'ENOENT')) return []
    throw err
  }
}

/** Creates an empty file of `size` bytes (sparse), for mkfs to fill. */
export async function allocateFile (path: string, size: number): Promise<void> {
  const fh = await open(path, 'w')
  try {
    await fh.truncate(size)
  } finally {
    await fh.close()
  }
}
