import { createHash } from 'node:crypto'
import { open } from 'node:fs/promises'
import { request as httpRequest, type IncomingMessage } from 'node:http'
import { request as httpsRequest } from 'node:https'
import { join } from 'node:path'
import { Value } from '@sinclair/typebox/value'
import { UigniterError } from '../core/errors.js'
import { ImageManifestSchema, formatImageRef, parseImageRef, type ImageManifest } from '../core/image.js'
import type { Logger } from '../core/logger.js'
import { isDigest, manifestContentDigest, type ImageStore } from './image-store.js'

export interface ImageFetchEvent {
  type: 'image.fetching' | 'image.fetched' | 'image.fetch-failed'
  digest: string
  ref: string | null
  peer: string | null
  bytes?: number
  ms?: number
  message: string
}

export interface ImageFetcherOptions {
  images: ImageStore
  /** The cluster's API token, sent as `Authorization: Bearer` to peers. */
  token?: string
  log: Logger
  onEvent?: (event: ImageFetchEvent) => void
  /** How long a peer may stay silent (connecting, before answering, between chunks); default 15 s. */
  timeoutMs?: number
}

/** A manifest is a few KB; anything near this is not one. */
const MAX_MANIFEST_BYTES = 1024 * 1024
const MAX_ERROR_BODY_BYTES = 4096
const DEFAULT_TIMEOUT_MS = 15_000

/** One peer's failure; `mismatch` when it served bytes that do not match their digest. */
class PeerFailure extends Error {
  readonly mismatch: boolean
  constructor (message: string, mismatch = false) {
    super(message)
    this.mismatch = mismatch
  }
}

/**
 * Fetches images by digest from peer nodes' APIs (issue 12), for a node given
 * a replica whose image it lacks. The manifest's digest is recomputed from its
 * content and each blob is hashed as it streams in; only then does anything
 * enter the store, so a bad peer leaves nothing behind. Blobs the store holds
 * are not fetched again, and concurrent calls for one digest share one fetch.
 *
 * Events: `image.fetching` and, on failure, `image.fetch-failed` once per peer
 * tried; `image.fetched` once, from the peer that served it.
 * @example
 * const manifest = await fetcher.ensure(digest, ['http://192.168.250.12:7377'], 'examples/hello:v1')
 */
export class ImageFetcher {
  readonly #images: ImageStore
  readonly #token: string | undefined
  readonly #log: Logger
  readonly #onEvent: (event: ImageFetchEvent) => void
  readonly #timeoutMs: number
  readonly #inflight = new Map<string, Promise<ImageManifest>>()

  constructor (options: ImageFetcherOptions) {
    if (options.timeoutMs !== undefined && !(options.timeoutMs > 0)) throw new TypeError('timeoutMs must be positive')
    this.#images = options.images
    this.#token = options.token
    this.#log = options.log.child({ component: 'image-fetch' })
    this.#onEvent = options.onEvent ?? (() => {})
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS
  }

  /**
   * The image `digest`, from the store or else from the first of `peers`
   * (API URLs) that serves it intact; `ref` (name:tag) is then pointed at it.
   * Throws UIG_ERR_IMAGE_DIGEST_MISMATCH when a peer served tampered or
   * damaged bytes and no other peer served good ones, UIG_ERR_IMAGE_FETCH_FAILED
   * when every peer failed otherwise; both name each peer's failure.
   */
  async ensure (digest: string, peers: string[], ref?: string): Promise<ImageManifest> {
    if (!isDigest(digest)) {
      throw new UigniterError('UIG_ERR_IMAGE_INVALID_NAME', `"${digest}" is not an image digest: expected sha256: and 64 lowercase hex digits`)
    }
    const wanted = ref === undefined ? undefined : parseImageRef(ref)
    const held = await this.#held(digest)
    if (held !== undefined) return wanted === undefined ? held : await this.#tag(held, wanted.name, wanted.tag)

    let shared = this.#inflight.get(digest)
    if (shared === undefined) {
      shared = this.#fetch(digest, peers, wanted === undefined ? null : formatImageRef(wanted))
      this.#inflight.set(digest, shared)
      // Cleared whichever way it ends, so a failed fetch can be retried.
      void shared.finally(() => this.#inflight.delete(digest)).catch(() => {})
    }
    const manifest = await shared
    // A caller that joined another's fetch may want its own ref on the image.
    return wanted === undefined ? manifest : await this.#tag(manifest, wanted.name, wanted.tag)
  }

  /** The manifest when it and every blob it boots from are in the store. */
  async #held (digest: string): Promise<ImageManifest | undefined> {
    const manifest = await this.#images.getByDigest(digest)
    if (manifest === undefined) return undefined
    for (const blob of blobsOf(manifest)) {
      if (!(await this.#images.hasBlob(blob.digest))) return undefined
    }
    return manifest
  }

  async #tag (manifest: ImageManifest, name: string, tag: string): Promise<ImageManifest> {
    const current = await this.#images.get(formatImageRef({ name, tag })).catch(() => undefined)
    if (current?.digest === manifest.digest) return current
    // Name and tag lie outside the digest: the local ref names the image here.
    const tagged = { ...manifest, name, tag }
    await this.#images.commit(tagged)
    return tagged
  }

  async #fetch (digest: string, peers: string[], ref: string | null): Promise<ImageManifest> {
    const failures: string[] = []
    let mismatch = false
    for (const peer of peers) {
      const started = performance.now()
      this.#onEvent({ type: 'image.fetching', digest, ref, peer, message: `fetching image ${ref ?? digest} from ${peer}` })
      try {
        const { manifest, bytes } = await this.#fetchFrom(peer, digest, ref)
        const ms = Math.round(performance.now() - started)
        this.#log.info({ digest, ref, peer, bytes, ms }, 'image fetched')
        this.#onEvent({ type: 'image.fetched', digest, ref, peer, bytes, ms, message: `fetched image ${ref ?? digest} from ${peer}: ${bytes} bytes in ${ms} ms` })
        return manifest
      } catch (err) {
        const message = err instanceof PeerFailure || err instanceof UigniterError ? err.message : String(err)
        if (err instanceof PeerFailure && err.mismatch) mismatch = true
        failures.push(`${peer}: ${message}`)
        this.#log.warn({ digest, ref, peer, err }, 'image fetch from a peer failed')
        this.#onEvent({ type: 'image.fetch-failed', digest, ref, peer, ms: Math.round(performance.now() - started), message: `fetching image ${ref ?? digest} from ${peer} failed: ${message}` })
        // Our own store failing (a full disk) is no peer's fault: the next peer would fail the same way.
        if (err instanceof UigniterError) throw err
      }
    }
    const summary = peers.length === 0 ? 'no peer node to fetch it from' : failures.join('; ')
    if (mismatch) {
      throw new UigniterError('UIG_ERR_IMAGE_DIGEST_MISMATCH', `image ${ref ?? digest}: a peer served bytes that do not match their digest, and nothing was stored (${summary})`)
    }
    throw new UigniterError('UIG_ERR_IMAGE_FETCH_FAILED', `image ${ref ?? digest} could not be fetched (${summary}); check that a node holding it is up and reachable`)
  }

  async #fetchFrom (peer: string, digest: string, ref: string | null): Promise<{ manifest: ImageManifest, bytes: number }> {
    const body = await this.#getBuffer(peerUrl(peer, `/v1/cluster/images/${digest}`), MAX_MANIFEST_BYTES)
    const manifest = parseManifest(body, digest)
    const missing: Array<{ digest: string, size: number }> = []
    for (const blob of blobsOf(manifest)) {
      if (!(await this.#images.hasBlob(blob.digest))) missing.push(blob)
    }
    let bytes = body.length
    const work = await this.#images.createWorkDir()
    try {
      // Every blob is fetched and verified before any enters the store: a bad one leaves nothing behind.
      const fetched: string[] = []
      for (const blob of missing) {
        const path = join(work, blob.digest.replace(/^sha256:/, ''))
        await this.#getToFile(peerUrl(peer, `/v1/cluster/blobs/${blob.digest}`), path, blob)
        fetched.push(path)
        bytes += blob.size
      }
      for (const [i, path] of fetched.entries()) {
        const stored = await this.#images.putBlob(path)
        if (stored.digest !== missing[i]?.digest) throw new Error(`blob ${path} changed on disk while it was stored`)
      }
      if (ref === null) {
        await this.#images.putManifest(manifest)
        return { manifest, bytes }
      }
      const { name, tag } = parseImageRef(ref)
      const tagged = { ...manifest, name, tag }
      await this.#images.commit(tagged)
      return { manifest: tagged, bytes }
    } finally {
      await this.#images.discardWorkDir(work)
    }
  }

  async #getBuffer (url: URL, limit: number): Promise<Buffer> {
    const response = await this.#get(url)
    const declared = contentLength(response)
    if (declared !== undefined && declared > limit) {
      response.destroy()
      throw new PeerFailure(`its manifest answer is ${declared} bytes, more than a manifest's ${limit}`)
    }
    const chunks: Buffer[] = []
    let length = 0
    await this.#drain(response, (chunk) => {
      length += chunk.length
      if (length > limit) throw new PeerFailure(`its manifest answer is longer than a manifest's ${limit} bytes`)
      chunks.push(chunk)
    })
    return Buffer.concat(chunks)
  }

  /** Streams a blob to `path`, hashing as it goes; more or other bytes than the manifest declares are a mismatch. */
  async #getToFile (url: URL, path: string, blob: { digest: string, size: number }): Promise<void> {
    const response = await this.#get(url)
    const declared = contentLength(response)
    if (declared !== undefined && declared !== blob.size) {
      response.destroy()
      throw new PeerFailure(`blob ${blob.digest} is ${declared} bytes long, not the ${blob.size} its manifest declares`, true)
    }
    const hash = createHash('sha256')
    let length = 0
    const file = await open(path, 'wx')
    try {
      await this.#drain(response, async (chunk) => {
        length += chunk.length
        if (length > blob.size) throw new PeerFailure(`blob ${blob.digest} is longer than the ${blob.size} bytes its manifest declares`, true)
        hash.update(chunk)
        await file.write(chunk)
      })
    } finally {
      await file.close()
    }
    if (length !== blob.size) throw new PeerFailure(`blob ${blob.digest} ended after ${length} of its ${blob.size} bytes`)
    const got = `sha256:${hash.digest('hex')}`
    if (got !== blob.digest) throw new PeerFailure(`blob ${blob.digest} has digest ${got}`, true)
  }

  /** A GET that resolves on a 200 answer; any other status is the peer's failure, with its error message. */
  async #get (url: URL): Promise<IncomingMessage> {
    const headers: Record<string, string> = { accept: 'application/json, application/octet-stream' }
    if (this.#token !== undefined) headers.authorization = `Bearer ${this.#token}`
    const response = await new Promise<IncomingMessage>((resolve, reject) => {
      const send = url.protocol === 'https:' ? httpsRequest : httpRequest
      // `timeout` is the socket's idle time, connecting included: a peer that never answers is let go.
      const req = send(url, { method: 'GET', headers, timeout: this.#timeoutMs })
      req.on('timeout', () => req.destroy(new PeerFailure(`no answer within ${this.#timeoutMs} ms`)))
      req.on('response', (response) => {
        // From here #drain's own idle timer watches the body.
        req.setTimeout(0)
        resolve(response)
      })
      req.on('error', (err) => reject(err instanceof PeerFailure ? err : new PeerFailure(errnoMessage(err))))
      req.end()
    })
    if (response.statusCode === 200) return response
    let text = ''
    await this.#drain(response, (chunk) => {
      if (text.length < MAX_ERROR_BODY_BYTES) text += chunk.toString('utf8', 0, MAX_ERROR_BODY_BYTES - text.length)
    }).catch(() => {})
    throw new PeerFailure(`GET ${url.pathname} answered HTTP ${response.statusCode ?? '?'}${describeErrorBody(text)}`)
  }

  /** Reads a response to its end; a peer that goes quiet mid-body is cut off after the idle timeout. */
  async #drain (response: IncomingMessage, onChunk: (chunk: Buffer) => void | Promise<void>): Promise<void> {
    let timer: NodeJS.Timeout | undefined
    const arm = (): void => {
      clearTimeout(timer)
      timer = setTimeout(() => response.destroy(new PeerFailure(`its answer stalled for ${this.#timeoutMs} ms`)), this.#timeoutMs)
    }
    arm()
    try {
      for await (const chunk of response) {
        arm()
        await onChunk(chunk as Buffer)
      }
    } catch (err) {
      response.destroy()
      if (err instanceof PeerFailure) throw err
      throw new PeerFailure(`its answer broke off: ${errnoMessage(err)}`)
    } finally {
      clearTimeout(timer)
    }
  }
}

/** The blobs an image boots from: what gc keeps for it (image-store.ts) and a fetch must bring. */
function blobsOf (manifest: ImageManifest): Array<{ digest: string, size: number }> {
  const blobs = [manifest.kernel.blob, manifest.rootfs].filter((b) => b !== undefined)
  return blobs.filter((b, i) => blobs.findIndex((other) => other.digest === b.digest) === i)
}

function parseManifest (body: Buffer, digest: string): ImageManifest {
  let parsed: unknown
  try {
    parsed = JSON.parse(body.toString('utf8'))
  } catch {
    throw new PeerFailure(`its manifest answer is not JSON (${body.length} bytes)`)
  }
  if (!Value.Check(ImageManifestSchema, parsed)) {
    const first = Value.Errors(ImageManifestSchema, parsed).First()
    throw new PeerFailure(`its manifest answer does not match the manifest schema${first === undefined ? '' : ` (${first.path || '/'}: ${first.message})`}`)
  }
  if (parsed.digest !== digest) throw new PeerFailure(`it served manifest ${parsed.digest} when asked for ${digest}`, true)
  // The manifest's own digest field proves nothing: what it describes must hash to the digest asked for.
  const computed = manifestContentDigest(parsed)
  if (computed !== digest) throw new PeerFailure(`its manifest's content has digest ${computed}, not ${digest}`, true)
  const total = blobsOf(parsed).reduce((n, b) => n + b.size, 0)
  if (parsed.size !== total) throw new PeerFailure(`its manifest says ${parsed.size} bytes but its blobs add up to ${total}`, true)
  return parsed
}

function peerUrl (peer: string, path: string): URL {
  let base: URL
  try {
    base = new URL(peer)
  } catch {
    throw new PeerFailure(`"${peer}" is not a URL`)
  }
  if (base.protocol !== 'http:' && base.protocol !== 'https:') throw new PeerFailure(`"${peer}" is not an http or https URL`)
  return new URL(path, base)
}

function contentLength (response: IncomingMessage): number | undefined {
  const header = response.headers['content-length']
  if (header === undefined) return undefined
  const n = Number(header)
  if (!Number.isSafeInteger(n) || n < 0) {
    response.destroy()
    throw new PeerFailure(`its answer has a malformed content-length "${header}"`)
  }
  return n
}

function describeErrorBody (text: string): string {
  try {
    const body = JSON.parse(text) as { code?: unknown, message?: unknown }
    if (typeof body.code === 'string' && typeof body.message === 'string') return `: ${body.code} ${body.message}`
  } catch {
    // Not our error body (a proxy's page, say): the status alone says it.
  }
  return ''
}

function errnoMessage (err: unknown): string {
  if (err instanceof Error) {
    const code = (err as NodeJS.ErrnoException).code
    return code !== undefined && !err.message.includes(code) ? `${code} ${err.message}` : err.message
  }
  return String(err)
}
