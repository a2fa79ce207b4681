import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { run } from '../../src/core/exec.js'
import { freePort } from '../../src/core/free-port.js'

export interface TestRegistry {
  /** host:port, as written in references. */
  host: string
  port: number
  storageDir: string
  /** The file the registry serves a blob from; tests overwrite it to serve tampered bytes. */
  blobFile: (digest: string) => string
  /** Stops the registry and removes its storage. */
  close: () => Promise<void>
}

export interface TestRegistryOptions {
  /** Basic auth through htpasswd (bcrypt). */
  auth?: { username: string, password: string }
  readyTimeoutMs?: number
}

/**
 * A bcrypt hash for htpasswd, which the registry insists on. Python's crypt
 * module wraps libxcrypt's bcrypt on Debian 12 (no python3-bcrypt there by
 * default); apache2-utils' `htpasswd -B` is used when it is installed.
 */
async function bcryptHash (password: string): Promise<string> {
  try {
    const { stdout } = await run('htpasswd', ['-nbB', 'u', password])
    return stdout.trim().split(':')[1] ?? ''
  } catch {
    const { stdout } = await run('python3', ['-W', 'ignore', '-c',
      'import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1<<4)))', password])
    return stdout.trim()
  }
}

/**
 * Debian's docker-registry (distribution 2.8) on a loopback port with a
 * temporary storage directory, plain HTTP (design.md fact 16). Waits until
 * /v2/ answers; the caller must close() it (t.after).
 * @example
 * const registry = await startRegistry({ auth: { username: 'ann', password: 'secret' } })
 * t.after(registry.close)
 */
export async function startRegistry (options: TestRegistryOptions = {}): Promise<TestRegistry> {
  const dir = await mkdtemp(join(tmpdir(), 'uigniter-registry-'))
  const storageDir = join(dir, 'storage')
  const port = await freePort()
  let authYaml = ''
  if (options.auth !== undefined) {
    const htpasswd = join(dir, 'htpasswd')
    await writeFile(htpasswd, `${options.auth.username}:${await bcryptHash(options.auth.password)}\n`)
    authYaml = `auth:\n  htpasswd:\n    realm: uigniter-test\n    path: ${htpasswd}\n`
  }
  const configPath = join(dir, 'config.yml')
  await writeFile(configPath, [
    'version: 0.1',
    'log:',
    '  level: error',
    '  accesslog:',
    '    disabled: true',
    'storage:',
    '  filesystem:',
    `    rootdirectory: ${storageDir}`,
    'http:',
    `  addr: 127.0.0.1:${port}`,
    authYaml
  ].join('\n'))
  const child: ChildProcess = spawn('docker-registry', ['serve', configPath], { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr?.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-4000) })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  const close = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM')
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000)
      await exited
      clearTimeout(timer)
    }
    await rm(dir, { recursive: true, force: true })
  }
  const deadline = Date.now() + (options.readyTimeoutMs ?? 15_000)
  for (;;) {
    if (child.exitCode !== null) {
      await close()
      throw new Error(`docker-registry exited with ${child.exitCode}: ${stderr}`)
    }
    try {
      const res = await fetch(`http://127.0.0.1:${port}/v2/`, { signal: AbortSignal.timeout(1000) })
      await res.body?.cancel()
      if (res.status === 200 || res.status === 401) break
    } catch {
      // Not listening yet.
    }
    if (Date.now() > deadline) {
      await close()
      throw new Error(`docker-registry did not answer on port ${port} in time: ${stderr}`)
    }
    await new Promise(resolve => setTimeout(resolve, 50))
  }
  const blobFile = (digest: string): string => {
    const hex = digest.replace(/^sha256:/, '')
    return join(storageDir, 'docker/registry/v2/blobs/sha256', hex.slice(0, 2), hex, 'data')
  }
  return { host: `127.0.0.1:${port}`, port, storageDir, blobFile, close }
}

export interface ProxiedRequest {
  method: string
  path: string
  range: string | undefined
  status: number
}

export interface CuttingProxy {
  host: string
  /** Every request that reached the proxy, in order. */
  requests: ProxiedRequest[]
  /** Cut the next full download of `digest` after `afterBytes` bytes of its body; undefined to stop cutting. */
  cut: { digest: string, afterBytes: number } | undefined
  close: () => Promise<void>
}

/**
 * A stand-in for a network that breaks: a tiny HTTP proxy in front of the
 * registry that counts requests and, when told, cuts one blob's download in
 * the middle by destroying the socket after some bytes (the client sees a
 * body shorter than its Content-Length).
 */
export async function startCuttingProxy (target: TestRegistry): Promise<CuttingProxy> {
  const { createServer, request } = await import('node:http')
  const proxy: CuttingProxy = { host: '', requests: [], cut: undefined, close: async () => {} }
  const server = createServer((req, res) => {
    const upstream = request({ host: '127.0.0.1', port: target.port, method: req.method, path: req.url, headers: req.headers }, (up) => {
      const record: ProxiedRequest = { method: req.method ?? '', path: req.url ?? '', range: req.headers.range, status: up.statusCode ?? 0 }
      proxy.requests.push(record)
      res.writeHead(up.statusCode ?? 502, up.headers)
      const cut = proxy.cut
      if (cut === undefined || up.statusCode !== 200 || !(req.url ?? '').endsWith(`/blobs/${cut.digest}`)) {
        up.pipe(res)
        return
      }
      let sent = 0
      up.on('data', (chunk: Buffer) => {
        if (sent >= cut.afterBytes) return
        const part = chunk.subarray(0, cut.afterBytes - sent)
        sent += part.length
        if (sent >= cut.afterBytes) {
          up.destroy()
          res.write(part, () => res.socket?.destroy())
        } else res.write(part)
      })
    })
    upstream.on('error', () => res.socket?.destroy())
    req.pipe(upstream)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  proxy.host = `127.0.0.1:${typeof address === 'object' && address !== null ? address.port : 0}`
  proxy.close = async () => {
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return proxy
}

export interface BearerGate {
  host: string
  /** Token requests, each with the scope asked for and whether its credentials were right. */
  tokenRequests: Array<{ scope: string | null, ok: boolean }>
  close: () => Promise<void>
}

/**
 * A stand-in for a registry's token service (Debian has no token server for
 * docker-registry): a proxy in front of the real registry that answers 401
 * with a `Bearer realm=…,service=…,scope=…` challenge unless the request
 * carries a token it issued, and a /token endpoint that issues one for the
 * right basic credentials, or for anyone when `anonymous` is set.
 */
export async function startBearerGate (target: TestRegistry, options: { credentials?: { username: string, password: string }, anonymous?: boolean }): Promise<BearerGate> {
  const { createServer, request } = await import('node:http')
  const { randomBytes } = await import('node:crypto')
  const issued = new Set<string>()
  const gate: BearerGate = { host: '', tokenRequests: [], close: async () => {} }
  const expected = options.credentials !== undefined ? `Basic ${Buffer.from(`${options.credentials.username}:${options.credentials.password}`).toString('base64')}` : undefined
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://gate')
    if (url.pathname === '/token') {
      const ok = options.anonymous === true || (expected !== undefined && req.headers.authorization === expected)
      gate.tokenRequests.push({ scope: url.searchParams.get('scope'), ok })
      if (!ok) { res.writeHead(401).end(); return }
      const token = randomBytes(16).toString('hex')
      issued.add(token)
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token, expires_in: 300 }))
      return
    }
    const token = /^Bearer (.+)$/.exec(req.headers.authorization ?? '')?.[1]
    if (token === undefined || !issued.has(token)) {
      const name = /^\/v2\/(.+)\/(?:manifests|blobs)\//.exec(url.pathname)?.[1] ?? ''
      res.writeHead(401, { 'www-authenticate': `Bearer realm="http://${gate.host}/token",service="stand-in",scope="repository:${name}:pull"`, 'content-type': 'application/json' })
        .end('{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}')
      return
    }
    const headers = { ...req.headers }
    delete headers.authorization
    const upstream = request({ host: '127.0.0.1', port: target.port, method: req.method, path: req.url, headers }, (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers)
      up.pipe(res)
    })
    upstream.on('error', () => res.socket?.destroy())
    req.pipe(upstream)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const address = server.address()
  gate.host = `127.0.0.1:${typeof address === 'object' && address !== null ? address.port : 0}`
  gate.close = async () => {
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return gate
}
