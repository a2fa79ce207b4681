import { createHash } from 'node:crypto'
import { ociError } from './oci-errors.js'
import { RegistryAuth, type BasicCredentials } from './registry-auth.js'
import { manifestAccept } from './media-types.js'
import { registryApiHost } from './reference.js'

export interface RegistryClientOptions {
  /** As in references: `docker.io`, `localhost:5000`. */
  registry: string
  /** Plain HTTP instead of HTTPS; only for registries the user named as insecure. */
  insecure?: boolean
  credentials?: BasicCredentials
  /** How long the registry may stay silent: before it answers, and between two chunks of a body. Default 30 s. */
  timeoutMs?: number
}

export interface FetchedManifest {
  mediaType: string
  /** sha256 of the bytes as served, which is what a digest reference pins. */
  digest: string
  bytes: Buffer
}

export interface BlobResponse {
  /** Where the bytes start: the offset asked for when the registry honoured the Range, else 0. */
  start: number
  /** The blob's bytes from `start`; iterating them enforces the idle timeout. */
  chunks: AsyncIterable<Uint8Array>
  /** Stops the transfer; safe after the end. */
  cancel: () => void
}

/** A manifest is a few KB; anything near this is not one. */
const maxManifestBytes = 4 * 1024 * 1024
const maxErrorBodyBytes = 8192
const defaultTimeoutMs = 30_000

/**
 * One registry's distribution API (v2): manifests and blobs of its
 * repositories, with the authorization its challenges ask for. A thin shim
 * over global fetch, which follows the redirects registries give for blobs
 * (to a CDN) and drops Authorization when they leave the registry's origin.
 */
export class RegistryClient {
  readonly registry: string
  readonly #base: string
  readonly #auth: RegistryAuth
  readonly #timeoutMs: number
  /** Requests sent, by kind; tests count them to show what a resumed pull fetches. */
  readonly requests = { manifests: 0, blobs: 0, tokens: 0 }

  constructor (options: RegistryClientOptions) {
    if (options.timeoutMs !== undefined && !(options.timeoutMs > 0)) throw new TypeError('timeoutMs must be positive')
    this.registry = options.registry
    this.#base = `${options.insecure === true ? 'http' : 'https'}://${registryApiHost(options.registry)}`
    this.#timeoutMs = options.timeoutMs ?? defaultTimeoutMs
    this.#auth = new RegistryAuth(options.registry, options.credentials, async (url, headers) => {
      this.requests.tokens++
      const res = await this.#send(url.toString(), { headers })
      return { status: res.status, body: (await readLimited(res, maxErrorBodyBytes * 8, 'token')).toString('utf8') }
    })
  }

  /** GET /v2/NAME/manifests/REF, asking for any manifest or index type we know. */
  async getManifest (repository: string, reference: string): Promise<FetchedManifest> {
    this.requests.manifests++
    const res = await this.#request(repository, `/v2/${repository}/manifests/${reference}`, { accept: manifestAccept })
    const bytes = await readLimited(res, maxManifestBytes, `manifest ${repository}:${reference}`)
    const mediaType = (res.headers.get('content-type') ?? '').split(';')[0]?.trim() ?? ''
    return { mediaType, digest: `sha256:${createHash('sha256').update(bytes).digest('hex')}`, bytes }
  }

  /** GET /v2/NAME/blobs/DIGEST, from `offset` with a Range request when it is past 0. */
  async openBlob (repository: string, digest: string, offset = 0): Promise<BlobResponse> {
    this.requests.blobs++
    const controller = new AbortController()
    const headers: Record<string, string> = offset > 0 ? { range: `bytes=${offset}-` } : {}
    const res = await this.#request(repository, `/v2/${repository}/blobs/${digest}`, headers, controller)
    let start = 0
    if (res.status === 206) {
      const m = /^bytes (\d+)-/.exec(res.headers.get('content-range') ?? '')
      start = m !== null ? Number(m[1]) : -1
      if (start !== offset) {
        controller.abort()
        throw ociError('registry', `registry ${this.registry} answered a range request for blob ${digest} from byte ${offset} with another range (${res.headers.get('content-range') ?? 'none'})`)
      }
    }
    const body = res.body
    if (body === null) throw ociError('registry', `registry ${this.registry} answered blob ${digest} without a body`)
    const timeoutMs = this.#timeoutMs
    const registry = this.registry
    async function * chunks (): AsyncGenerator<Uint8Array> {
      const reader = body!.getReader()
      let timer: NodeJS.Timeout | undefined
      const arm = (): void => {
        clearTimeout(timer)
        timer = setTimeout(() => controller.abort(), timeoutMs)
      }
      try {
        for (;;) {
          arm()
          let step: Awaited<ReturnType<typeof reader.read>>
          try {
            step = await reader.read()
          } catch (err) {
            const why = controller.signal.aborted ? `no data for ${timeoutMs} ms` : describe(err)
            throw ociError('registry', `the download of blob ${digest} from ${registry} broke off: ${why}`, { cause: err })
          }
          if (step.done) return
          yield step.value
        }
      } finally {
        clearTimeout(timer)
        reader.releaseLock()
      }
    }
    return { start, chunks: chunks(), cancel: () => controller.abort() }
  }

  /** One API request with its authorization, retried once after a 401 challenge. */
  async #request (repository: string, path: string, headers: Record<string, string>, controller?: AbortController): Promise<Response> {
    const scope = `repository:${repository}:pull`
    let retried = false
    for (;;) {
      const authorization = await this.#auth.header(scope)
      const res = await this.#send(this.#base + path, { headers: { ...headers, ...(authorization !== undefined ? { authorization } : {}) } }, controller)
      if (res.status === 401) {
        const header = res.headers.get('www-authenticate')
        await res.body?.cancel()
        if (await this.#auth.challenge(header, scope, retried)) {
          retried = true
          continue
        }
        const what = this.#auth.hasCredentials ? 'refused the credentials given for it' : 'asks for credentials and none were given (name a credentials file in Docker\'s config.json format)'
        throw ociError('auth', `registry ${this.registry} answered 401 Unauthorized for ${repository}: it ${what}`, { httpStatus: 401 })
      }
      if (res.status === 200 || res.status === 206) return res
      const detail = await registryErrorDetail(res)
      if (res.status === 404) {
        throw ociError('not-found', `registry ${this.registry} has no ${path.includes('/manifests/') ? 'manifest' : 'blob'} ${path.split('/').pop() ?? ''} in ${repository}${detail}`, { httpStatus: 404 })
      }
      if (res.status === 403) throw ociError('auth', `registry ${this.registry} forbids pulling ${repository}${detail}`, { httpStatus: 403 })
      throw ociError('registry', `registry ${this.registry} answered HTTP ${res.status} for ${path}${detail}`, { httpStatus: res.status })
    }
  }

  /** fetch with a deadline on the answer's headers; the body's own idle timer is the caller's. */
  async #send (url: string, init: { headers: Record<string, string> }, controller = new AbortController()): Promise<Response> {
    const timer = setTimeout(() => controller.abort(), this.#timeoutMs)
    try {
      return await fetch(url, { ...init, redirect: 'follow', signal: controller.signal })
    } catch (err) {
      const why = controller.signal.aborted ? `no answer within ${this.#timeoutMs} ms` : describe(err)
      throw ociError('registry', `registry ${this.registry} cannot be reached at ${url}: ${why}${url.startsWith('https:') ? ' (a plain-HTTP registry needs --insecure, or its host:port in the config\'s registries.insecure)' : ''}`, { cause: err })
    } finally {
      clearTimeout(timer)
    }
  }
}

/** fetch's errors say "fetch failed"; the cause says why (ECONNREFUSED, a TLS error). */
function describe (err: unknown): string {
  const cause = (err as { cause?: { code?: string, message?: string } }).cause
  return cause?.code ?? cause?.message ?? (err as Error).message
}

async function readLimited (res: Response, limit: number, what: string): Promise<Buffer> {
  const length = Number(res.headers.get('content-length') ?? NaN)
  if (length > limit) {
    await res.body?.cancel()
    throw ociError('registry', `the ${what} is ${length} bytes, more than the ${limit} allowed`)
  }
  const parts: Buffer[] = []
  let total = 0
  if (res.body === null) return Buffer.alloc(0)
  try {
    for await (const value of res.body) {
      const chunk = value as Uint8Array
      total += chunk.length
      if (total > limit) {
        await res.body.cancel()
        throw ociError('registry', `the ${what} is more than the ${limit} bytes allowed`)
      }
      parts.push(Buffer.from(chunk))
    }
  } catch (err) {
    if (err instanceof Error && 'reason' in err) throw err
    throw ociError('registry', `the ${what} could not be read: ${describe(err)}`, { cause: err })
  }
  return Buffer.concat(parts)
}

/** The registry's own words, from its `{"errors":[{"code","message"}]}` body. */
async function registryErrorDetail (res: Response): Promise<string> {
  try {
    const body = (await readLimited(res, maxErrorBodyBytes, 'error')).toString('utf8')
    const doc = JSON.parse(body) as { errors?: Array<{ code?: string, message?: string }> }
    const first = doc.errors?.[0]
    if (first !== undefined) return ` (${[first.code, first.message].filter(Boolean).join(': ')})`
  } catch {
    // No JSON body: the status says it all.
  }
  return ''
}
