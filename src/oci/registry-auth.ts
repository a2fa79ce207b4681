import { readFile } from 'node:fs/promises'
import { hasErrno } from '../core/errors.js'
import { ociError } from './oci-errors.js'
import { dockerHub } from './reference.js'

export interface BasicCredentials {
  username: string
  password: string
}

/** One challenge of a `WWW-Authenticate` header: its scheme and parameters (names lower-cased). */
export interface AuthChallenge {
  scheme: string
  params: Record<string, string>
}

/**
 * Parses a `WWW-Authenticate` header (RFC 7235), which may hold several
 * challenges separated by commas, as may the parameters inside each one:
 * `Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull"`.
 */
export function parseChallenges (header: string): AuthChallenge[] {
  const challenges: AuthChallenge[] = []
  const tokenRe = /\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*/y
  let i = 0
  let current: AuthChallenge | undefined
  while (i < header.length) {
    tokenRe.lastIndex = i
    const m = tokenRe.exec(header)
    if (m === null) { i++; continue }
    const word = m[1] ?? ''
    i = tokenRe.lastIndex
    if (header[i] === '=') {
      // A parameter of the current challenge.
      i++
      let value = ''
      if (header[i] === '"') {
        i++
        while (i < header.length && header[i] !== '"') {
          if (header[i] === '\\') i++
          value += header[i] ?? ''
          i++
        }
        i++
      } else {
        const end = header.indexOf(',', i)
        value = header.slice(i, end < 0 ? undefined : end).trim()
        i = end < 0 ? header.length : end
      }
      if (current !== undefined) current.params[word.toLowerCase()] = value
    } else {
      current = { scheme: word.toLowerCase(), params: {} }
      challenges.push(current)
    }
    while (i < header.length && (header[i] === ',' || header[i] === ' ')) i++
  }
  return challenges
}

/** Docker's config.json keys a registry as a host, or a URL of it (`https://index.docker.io/v1/`). */
function registryKey (key: string): string {
  const host = key.replace(/^[a-z]+:\/\//i, '').replace(/\/.*$/, '').toLowerCase()
  return host === 'index.docker.io' || host === 'registry-1.docker.io' ? dockerHub : host
}

/**
 * The credentials of a file in Docker's config.json format: `auths` maps a
 * registry to `auth`, base64 of `user:password` (or to `username` and
 * `password`). Credential helpers (`credsStore`) are not run.
 */
export class CredentialsFile {
  readonly #byRegistry: Map<string, BasicCredentials>

  private constructor (byRegistry: Map<string, BasicCredentials>) {
    this.#byRegistry = byRegistry
  }

  static async load (path: string): Promise<CredentialsFile> {
    let text: string
    try {
      text = await readFile(path, 'utf8')
    } catch (err) {
      const why = hasErrno(err, 'ENOENT') ? 'it does not exist' : 'it cannot be read'
      throw ociError('auth', `the registry credentials file ${path} cannot be used: ${why}`, { cause: err })
    }
    return CredentialsFile.parse(text, path)
  }

  static parse (text: string, source = 'credentials'): CredentialsFile {
    const bad = (why: string): never => {
      throw ociError('auth', `the registry credentials file ${source} is not in Docker's config.json format: ${why}`)
    }
    let doc: unknown
    try { doc = JSON.parse(text) } catch (err) { bad(`it is not JSON (${(err as Error).message})`) }
    if (typeof doc !== 'object' || doc === null) bad('it is not an object')
    const auths = (doc as { auths?: unknown }).auths ?? {}
    if (typeof auths !== 'object' || auths === null) bad('"auths" is not an object')
    const byRegistry = new Map<string, BasicCredentials>()
    for (const [key, entry] of Object.entries(auths as Record<string, unknown>)) {
      if (typeof entry !== 'object' || entry === null) bad(`auths[${JSON.stringify(key)}] is not an object`)
      const { auth, username, password } = entry as { auth?: unknown, username?: unknown, password?: unknown }
      if (typeof auth === 'string' && auth !== '') {
        const decoded = Buffer.from(auth, 'base64').toString('utf8')
        const colon = decoded.indexOf(':')
        if (colon <= 0) bad(`auths[${JSON.stringify(key)}].auth is not base64 of user:password`)
        byRegistry.set(registryKey(key), { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) })
      } else if (typeof username === 'string' && typeof password === 'string') {
        byRegistry.set(registryKey(key), { username, password })
      }
    }
    return new CredentialsFile(byRegistry)
  }

  /** The credentials for a registry as written in references (`docker.io`, `localhost:5000`). */
  lookup (registry: string): BasicCredentials | undefined {
    return this.#byRegistry.get(registryKey(registry))
  }
}

interface CachedToken {
  token: string
  expiresAt: number
}

/** Fetches a bearer token from a token service; injected so that tests and the client share one transport. */
export type TokenFetch = (url: URL, headers: Record<string, string>) => Promise<{ status: number, body: string }>

/** Tokens are refreshed this long before they expire, so that a request in flight does not carry a stale one. */
const tokenSlackMs = 10_000
/** Docker's token spec: a token without expires_in lasts 60 s. */
const defaultTokenLifeS = 60

/**
 * Authorization for one registry: nothing until it answers 401, then what its
 * challenge asks for. Basic sends the user's credentials; Bearer trades them
 * (or nothing, for anonymous pulls) at the challenge's realm for a token,
 * cached per scope (`repository:NAME:pull`) until it expires.
 */
export class RegistryAuth {
  readonly #registry: string
  readonly #credentials: BasicCredentials | undefined
  readonly #fetchToken: TokenFetch
  readonly #tokens = new Map<string, CachedToken>()
  #scheme: 'none' | 'basic' | 'bearer' = 'none'
  #bearerChallenge: Record<string, string> | undefined

  constructor (registry: string, credentials: BasicCredentials | undefined, fetchToken: TokenFetch) {
    this.#registry = registry
    this.#credentials = credentials
    this.#fetchToken = fetchToken
  }

  get hasCredentials (): boolean {
    return this.#credentials !== undefined
  }

  /** The Authorization header for a request in `scope`, once a challenge said which scheme. */
  async header (scope: string): Promise<string | undefined> {
    if (this.#scheme === 'basic' && this.#credentials !== undefined) return basicHeader(this.#credentials)
    if (this.#scheme === 'bearer') {
      const cached = this.#tokens.get(scope)
      if (cached !== undefined && cached.expiresAt > Date.now()) return `Bearer ${cached.token}`
      if (this.#bearerChallenge !== undefined) return `Bearer ${await this.#requestToken(this.#bearerChallenge, scope)}`
    }
    return undefined
  }

  /**
   * Takes a 401's `WWW-Authenticate` header. Answers true when a retry may
   * succeed; false when it cannot (no credentials for Basic, or the same
   * answer again), and the caller reports the 401.
   */
  async challenge (header: string | null, scope: string, alreadyRetried: boolean): Promise<boolean> {
    if (alreadyRetried) return false
    const challenges = parseChallenges(header ?? '')
    const bearer = challenges.find(c => c.scheme === 'bearer')
    if (bearer?.params.realm !== undefined) {
      this.#scheme = 'bearer'
      this.#bearerChallenge = bearer.params
      this.#tokens.delete(scope)
      await this.#requestToken(bearer.params, scope)
      return true
    }
    if (challenges.some(c => c.scheme === 'basic') && this.#credentials !== undefined) {
      this.#scheme = 'basic'
      return true
    }
    return false
  }

  async #requestToken (challenge: Record<string, string>, scope: string): Promise<string> {
    let url: URL
    try {
      url = new URL(challenge.realm ?? '')
    } catch (err) {
      throw ociError('auth', `registry ${this.#registry} names a token realm that is not a URL: ${JSON.stringify(challenge.realm)}`, { cause: err })
    }
    if (challenge.service !== undefined) url.searchParams.set('service', challenge.service)
    // Our scope, not the challenge's: a challenge for one repository must not stand in for another.
    url.searchParams.set('scope', scope)
    const headers: Record<string, string> = {}
    if (this.#credentials !== undefined) headers.authorization = basicHeader(this.#credentials)
    const answer = await this.#fetchToken(url, headers)
    if (answer.status === 401 || answer.status === 403) {
      throw ociError('auth', `the token service of registry ${this.#registry} refused ${this.#credentials !== undefined ? `the credentials of ${this.#credentials.username}` : 'an anonymous pull'} for ${scope} (HTTP ${answer.status}); check the credentials file`, { httpStatus: answer.status })
    }
    if (answer.status !== 200) {
      throw ociError('auth', `the token service of registry ${this.#registry} answered HTTP ${answer.status} for ${scope}`, { httpStatus: answer.status })
    }
    let token: unknown
    let expiresIn: unknown
    try {
      const doc = JSON.parse(answer.body) as { token?: unknown, access_token?: unknown, expires_in?: unknown }
      token = doc.token ?? doc.access_token
      expiresIn = doc.expires_in
    } catch (err) {
      throw ociError('auth', `the token service of registry ${this.#registry} answered with something other than JSON`, { cause: err })
    }
    if (typeof token !== 'string' || token === '') throw ociError('auth', `the token service of registry ${this.#registry} answered without a token`)
    const lifeS = typeof expiresIn === 'number' && expiresIn > 0 ? expiresIn : defaultTokenLifeS
    this.#tokens.set(scope, { token, expiresAt: Date.now() + lifeS * 1000 - tokenSlackMs })
    return token
  }
}

function basicHeader (c: BasicCredentials): string {
  return `Basic ${Buffer.from(`${c.username}:${c.password}`).toString('base64')}`
}
