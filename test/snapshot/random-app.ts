import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

/**
 * A Node.js test app for clone-safety tests, unchanged from what any app
 * would do (no uigniter code): GET / answers one value of each random API
 * as JSON; POST /ok-hook answers 204 and counts, POST /fail-hook answers 500.
 * ESM with named imports, so that the preload's ESM re-sync is tested too.
 */
const SERVER = `
import { getRandomValues, randomBytes, randomFill, randomFillSync, randomInt, randomUUID, webcrypto } from 'node:crypto'
import { createServer } from 'node:http'
import { hostname } from 'node:os'
import { promisify } from 'node:util'

const hex = (view) => Buffer.from(view.buffer, view.byteOffset, view.byteLength).toString('hex')
let hooks = 0

async function values () {
  return {
    host: hostname(),
    randomUUID: randomUUID(),
    randomUUIDUnbuffered: randomUUID({ disableEntropyCache: true }),
    randomBytes: randomBytes(8).toString('hex'),
    randomBytesAsync: (await promisify(randomBytes)(8)).toString('hex'),
    randomFillSync: hex(randomFillSync(new Uint32Array(2))),
    randomFill: hex(await promisify(randomFill)(new Uint8Array(8))),
    randomInt: String(randomInt(2 ** 47)),
    randomIntAsync: String(await promisify(randomInt)(0, 2 ** 47)),
    getRandomValues: hex(getRandomValues(new Uint8Array(8))),
    webcryptoGetRandomValues: hex(webcrypto.getRandomValues(new Uint16Array(4))),
    globalCryptoGetRandomValues: hex(globalThis.crypto.getRandomValues(new Uint8Array(8))),
    mathRandom: String(Math.random()),
    hooks
  }
}

createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/ok-hook') { hooks++; res.writeHead(204).end(); return }
  if (req.method === 'POST' && req.url === '/fail-hook') { res.writeHead(500).end('no\\n'); return }
  values().then((v) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify(v) + '\\n')
  }, (err) => { res.writeHead(500).end(String(err)) })
}).listen(8080, () => console.log('random-app: listening on :8080'))
`

/** The keys of GET /'s answer that must differ between clones. */
export const RANDOM_KEYS = ['randomUUID', 'randomUUIDUnbuffered', 'randomBytes', 'randomBytesAsync', 'randomFillSync', 'randomFill', 'randomInt', 'randomIntAsync',
  'getRandomValues', 'webcryptoGetRandomValues', 'globalCryptoGetRandomValues', 'mathRandom'] as const

/** Writes the app into `scratch` and returns a build spec for it (a node source, as a user would write it). */
export async function randomAppSpec (scratch: string, name = 'random-app'): Promise<Record<string, unknown>> {
  const dir = join(scratch, 'random-app')
  await mkdir(dir, { recursive: true })
  await writeFile(join(dir, 'package.json'), '{ "type": "module" }\n')
  await writeFile(join(dir, 'server.js'), SERVER)
  return { name, source: { kind: 'node', dir, entry: 'server.js' }, memoryMiB: 256, ports: [{ port: 8080, protocol: 'http' }] }
}
