import { createHash, type Hash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { hasErrno, rethrowNoSpace } from '../core/errors.js'
import { writeFileAtomic } from '../core/fs-atomic.js'
import { ociError } from './oci-errors.js'
import type { BlobResponse } from './registry-client.js'

export interface BlobProgress {
  digest: string
  /** Bytes on disk so far, counting those a resumed download already had. */
  received: number
  size: number
  state: 'cached' | 'downloading' | 'done'
}

export interface EnsuredBlob {
  path: string
  /** False when the cache held the blob already. */
  fetched: boolean
  /** The byte a download resumed from (0 when it started afresh or was not needed). */
  resumedFrom: number
}

/** Opens the blob's bytes from an offset; the registry client's openBlob, bound to a repository. */
export type BlobOpener = (offset: number) => Promise<BlobResponse>

const hexRe = /^sha256:([a-f0-9]{64})$/

/**
 * Blobs by digest under `<dataDir>/oci/blobs/sha256/<hex>`, shared by every
 * image that has them. A blob enters only whole and verified: it streams into
 * `<dataDir>/oci/partial/<hex>`, hashed as it comes, and is renamed into place
 * once its digest and size match. A download that breaks leaves its partial
 * file to be resumed with a Range request (re-hashing what is there first);
 * one that does not match its digest leaves nothing. Concurrent calls for one
 * digest in this process share one download.
 * @example
 * const { path } = await cache.ensure(layer.digest, layer.size, async (offset) => await client.openBlob(repo, layer.digest, offset))
 */
export class BlobCache {
  readonly root: string
  readonly #blobs: string
  readonly #partials: string
  readonly #inflight = new Map<string, Promise<EnsuredBlob>>()

  constructor (dataDir: string) {
    this.root = join(dataDir, 'oci')
    this.#blobs = join(this.root, 'blobs', 'sha256')
    this.#partials = join(this.root, 'partial')
  }

  path (digest: string): string {
    return join(this.#blobs, hexOf(digest))
  }

  partialPath (digest: string): string {
    return join(this.#partials, hexOf(digest))
  }

  async has (digest: string): Promise<boolean> {
    try {
      return (await stat(this.path(digest))).isFile()
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) return false
      throw err
    }
  }

  async read (digest: string): Promise<Buffer> {
    return await readFile(this.path(digest))
  }

  /** Stores small content we already hold (a manifest), after checking it against its digest. */
  async put (digest: string, bytes: Buffer): Promise<string> {
    const actual = sha256(bytes)
    if (actual !== digest) throw ociError('digest-mismatch', `content expected to be ${digest} hashes to ${actual}; it was not stored`)
    const path = this.path(digest)
    if (!await this.has(digest)) await writeFileAtomic(path, bytes)
    return path
  }

  /** The blob, from the cache or else downloaded through `openBlob`, verified. */
  async ensure (digest: string, size: number, openBlob: BlobOpener, onProgress?: (p: BlobProgress) => void): Promise<EnsuredBlob> {
    hexOf(digest)
    const pending = this.#inflight.get(digest)
    // A joiner did not download it: only the first caller counts the fetch.
    if (pending !== undefined) return { ...await pending, fetched: false, resumedFrom: 0 }
    const work = this.#ensure(digest, size, openBlob, onProgress ?? (() => {}))
    this.#inflight.set(digest, work)
    try {
      return await work
    } finally {
      this.#inflight.delete(digest)
    }
  }

  async #ensure (digest: string, size: number, openBlob: BlobOpener, onProgress: (p: BlobProgress) => void): Promise<EnsuredBlob> {
    const path = this.path(digest)
    if (await this.has(digest)) {
      onProgress({ digest, received: size, size, state: 'cached' })
      return { path, fetched: false, resumedFrom: 0 }
    }
    const partial = this.partialPath(digest)
    await mkdir(this.#partials, { recursive: true })
    await mkdir(this.#blobs, { recursive: true })
    const hash = createHash('sha256')
    let have = await hashExisting(partial, hash)
    if (have >= size) {
      // As long as the blob, or longer, yet never renamed: it failed its check, or the size was wrong.
      await rm(partial, { force: true })
      have = 0
    }
    const response = await openBlob(have)
    let resumedFrom = have
    let activeHash = hash
    if (response.start === 0 && have > 0) {
      // The registry ignored the Range and sent everything: start over.
      have = 0
      resumedFrom = 0
      activeHash = createHash('sha256')
    }
    const file = await open(partial, have > 0 ? 'a' : 'w')
    let received = have
    try {
      try {
        onProgress({ digest, received, size, state: 'downloading' })
        for await (const chunk of response.chunks) {
          received += chunk.length
          if (received > size) {
            response.cancel()
            throw ociError('digest-mismatch', `blob ${digest} is longer than the ${size} bytes its manifest gives; it was discarded`)
          }
          activeHash.update(chunk)
          await file.write(chunk)
          onProgress({ digest, received, size, state: 'downloading' })
        }
        await file.sync()
      } finally {
        await file.close()
      }
    } catch (err) {
      if (err instanceof Error && 'reason' in err && err.reason === 'digest-mismatch') await rm(partial, { force: true })
      if (hasErrno(err, 'ENOSPC', 'EDQUOT')) rethrowNoSpace(err, partial)
      throw err
    }
    const actual = `sha256:${activeHash.digest('hex')}`
    if (received !== size || actual !== digest) {
      await rm(partial, { force: true })
      const why = received !== size ? `${received} bytes arrived of the ${size} its manifest gives` : `its content hashes to ${actual}`
      throw ociError('digest-mismatch', `blob ${digest} failed verification (${why}); it was discarded, nothing was stored`)
    }
    await rename(partial, path)
    onProgress({ digest, received, size, state: 'done' })
    return { path, fetched: true, resumedFrom }
  }
}

function hexOf (digest: string): string {
  const m = hexRe.exec(digest)
  if (m === null) throw ociError('manifest-unsupported', `digest ${JSON.stringify(digest)} is not sha256: and 64 lower-case hex digits, the only kind uigniter verifies`)
  return m[1] as string
}

function sha256 (bytes: Buffer): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`
}

/** Feeds a partial file's bytes into `hash`; answers how many there were (0 when there is none). */
async function hashExisting (path: string, hash: Hash): Promise<number> {
  let length = 0
  try {
    for await (const chunk of createReadStream(path)) {
      const bytes = chunk as Buffer
      hash.update(bytes)
      length += bytes.length
    }
  } catch (err) {
    if (hasErrno(err, 'ENOENT')) return 0
    throw err
  }
  return length
}
