import assert from 'node:assert/strict'
import { createServer, type Server, type ServerResponse } from 'node:http'
import { readdir, readFile } from 'node:fs/promises'
import type { AddressInfo } from 'node:net'
import { after, before, describe, test, type TestContext } from 'node:test'
import Fastify, { type FastifyInstance } from 'fastify'
import { pino } from 'pino'
import { installErrorHandlers } from '../../src/api/errors.js'
import { imageBlobRoutes } from '../../src/api/image-blob-routes.js'
import { UigniterError } from '../../src/core/errors.js'
import type { ImageManifest } from '../../src/core/image.js'
import { ImageFetcher, type ImageFetchEvent } from '../../src/guest/image-fetch.js'
import { ImageStore, digestFile, manifestContentDigest } from '../../src/guest/image-store.js'
import { rejectsWith, tempDir } from '../helpers/assertions.js'
import { createTestContext, packageRoot } from '../helpers/fixtures.js'

const TOKEN = 'cluster-token-for-the-test'
const log = pino({ level: 'silent' })

/** Node A's API as the daemon would serve it: the routes under test behind the bearer-token check. */
async function servePeer (images: ImageStore, seen: string[]): Promise<{ app: FastifyInstance, url: string }> {
  const app = Fastify({ forceCloseConnections: true })
  installErrorHandlers(app)
  app.addHook('onRequest', (request, _reply, done) => {
    seen.push(request.url)
    done(request.headers.authorization === `Bearer ${TOKEN}` ? undefined : new UigniterError('UIG_ERR_API_UNAUTHORIZED', 'token required'))
  })
  await app.register(imageBlobRoutes, { images })
  const url = await app.listen({ host: '127.0.0.1', port: 0 })
  return { app, url }
}

/** A hand-written stand-in for a peer that misbehaves; `handle` decides each answer. */
async function standInPeer (t: TestContext, handle: (url: string, res: ServerResponse) => void): Promise<string> {
  const server: Server = createServer((req, res) => handle(req.url ?? '', res))
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.after(async () => {
    server.closeAllConnections()
    await new Promise((resolve) => server.close(resolve))
  })
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`
}

/** A port nothing listens on: bound, then released. */
async function closedPort (): Promise<string> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  await new Promise((resolve) => server.close(resolve))
  return `http://127.0.0.1:${port}`
}

async function storeContents (store: ImageStore): Promise<string[]> {
  const list = async (dir: string): Promise<string[]> => await readdir(`${store.root}/${dir}`).catch(() => [])
  return [
    ...(await list('blobs/sha256')).map((f) => `blob ${f}`),
    ...(await list('manifests')).map((f) => `manifest ${f}`),
    ...(await list('refs')).map((f) => `ref ${f}`),
    ...(await list('tmp')).map((f) => `tmp ${f}`)
  ].sort()
}

describe('image fetch from a peer node', { timeout: 120_000 }, () => {
  let ctx: Awaited<ReturnType<typeof createTestContext>>
  let image: ImageManifest
  let peer: { app: FastifyInstance, url: string }
  const seen: string[] = []

  before(async () => {
    ctx = await createTestContext()
    image = await ctx.builder.build({ name: 'hello:v1', source: { kind: 'elf', path: 'build/examples/hello', args: ['8080'] }, memoryMiB: 64, ports: [{ port: 8080, protocol: 'http' }] }, packageRoot)
    peer = await servePeer(ctx.store, seen)
  })
  after(async () => {
    await peer?.app.close()
    await ctx?.cleanup()
  })

  const freshStore = async (t: TestContext): Promise<ImageStore> => new ImageStore(await tempDir(t, 'uigniter-node-b-'))

  test('the store\'s manifest digest is what the content of a stored manifest hashes to', async () => {
    const stored = JSON.parse((await ctx.store.manifestBytes(image.digest))!.toString()) as ImageManifest
    assert.equal(manifestContentDigest(stored), image.digest)
    assert.equal(manifestContentDigest({ ...stored, name: 'other', tag: 'x', createdAt: 'later' }), image.digest)
    assert.notEqual(manifestContentDigest({ ...stored, cmdline: 'init=/bin/sh' }), image.digest)
  })

  test('a node fetches the image by digest, verifies it, and finds it by ref; a second ensure fetches nothing', async (t) => {
    const b = await freshStore(t)
    const events: ImageFetchEvent[] = []
    const fetcher = new ImageFetcher({ images: b, token: TOKEN, log, onEvent: (e) => events.push(e) })
    seen.length = 0
    const fetched = await fetcher.ensure(image.digest, [peer.url], 'hello:v1')
    assert.equal(fetched.digest, image.digest)
    assert.deepEqual(seen.sort(), [
      `/v1/cluster/blobs/${image.kernel.blob.digest}`, `/v1/cluster/blobs/${image.rootfs!.digest}`, `/v1/cluster/images/${image.digest}`
    ].sort())
    for (const blob of [image.kernel.blob, image.rootfs!]) {
      assert.equal(await digestFile(b.blobPath(blob.digest)), blob.digest)
      assert.ok((await readFile(b.blobPath(blob.digest))).equals(await readFile(ctx.store.blobPath(blob.digest))))
    }
    assert.deepEqual(await b.get('hello:v1'), await ctx.store.get('hello:v1'))
    assert.deepEqual(events.map((e) => e.type), ['image.fetching', 'image.fetched'])
    assert.equal(events[1]?.peer, peer.url)
    assert.equal(events[1]?.bytes, image.size + (await ctx.store.manifestBytes(image.digest))!.length)
    assert.deepEqual(await storeContents(b), [
      `blob ${image.kernel.blob.digest.slice(7)}`, `blob ${image.rootfs!.digest.slice(7)}`, `manifest ${image.digest.slice(7)}.json`, 'ref hello'
    ].sort())

    seen.length = 0
    events.length = 0
    const again = await fetcher.ensure(image.digest, [peer.url], 'hello:v1')
    assert.equal(again.digest, image.digest)
    assert.deepEqual(seen, [], 'held: no request')
    assert.deepEqual(events, [])

    // Another tag of a held image is a local ref, not a fetch.
    await fetcher.ensure(image.digest, [peer.url], 'hello:stable')
    assert.deepEqual(seen, [])
    assert.equal((await b.get('hello:stable')).digest, image.digest)
  })

  test('blobs the node holds are not fetched again; concurrent ensures share one fetch', async (t) => {
    const b = await freshStore(t)
    await b.importFile(ctx.store.blobPath(image.kernel.blob.digest))
    const fetcher = new ImageFetcher({ images: b, token: TOKEN, log })
    seen.length = 0
    const [one, two] = await Promise.all([
      fetcher.ensure(image.digest, [peer.url], 'hello:v1'),
      fetcher.ensure(image.digest, [peer.url], 'hello:v1')
    ])
    assert.equal(one.digest, image.digest)
    assert.equal(two.digest, image.digest)
    assert.deepEqual(seen.sort(), [`/v1/cluster/blobs/${image.rootfs!.digest}`, `/v1/cluster/images/${image.digest}`].sort())
  })

  test('without a ref the manifest is stored untagged', async (t) => {
    const b = await freshStore(t)
    const fetched = await new ImageFetcher({ images: b, token: TOKEN, log }).ensure(image.digest, [peer.url])
    assert.equal(fetched.name, 'hello')
    assert.equal((await b.getByDigest(image.digest))?.digest, image.digest)
    assert.deepEqual(await b.list(), [])
  })

  test('the first peer down, the second serves: the fetch succeeds and the events show both', async (t) => {
    const b = await freshStore(t)
    const events: ImageFetchEvent[] = []
    const down = await closedPort()
    await new ImageFetcher({ images: b, token: TOKEN, log, onEvent: (e) => events.push(e) }).ensure(image.digest, [down, peer.url], 'hello:v1')
    assert.deepEqual(events.map((e) => [e.type, e.peer]), [
      ['image.fetching', down], ['image.fetch-failed', down], ['image.fetching', peer.url], ['image.fetched', peer.url]
    ])
    assert.match(events[1]!.message, /ECONNREFUSED/)
    assert.equal((await b.get('hello:v1')).digest, image.digest)
  })

  test('a peer serving a tampered blob: UIG_ERR_IMAGE_DIGEST_MISMATCH and the node holds nothing new', async (t) => {
    const manifestBytes = (await ctx.store.manifestBytes(image.digest))!
    const tamperingPeerStandIn = await standInPeer(t, (url, res) => {
      if (url.startsWith('/v1/cluster/images/')) return res.end(manifestBytes)
      void readFile(ctx.store.blobPath(url.split('/').pop()!)).then((blob) => {
        blob.writeUInt8(blob.readUInt8(blob.length >> 1) ^ 0xff, blob.length >> 1)
        res.end(blob)
      })
    })
    const b = await freshStore(t)
    await rejectsWith(new ImageFetcher({ images: b, log }).ensure(image.digest, [tamperingPeerStandIn], 'hello:v1'),
      'UIG_ERR_IMAGE_DIGEST_MISMATCH', tamperingPeerStandIn, 'has digest')
    assert.deepEqual(await storeContents(b), [])
  })

  test('a peer serving a manifest whose content was changed under the same digest: mismatch, nothing stored', async (t) => {
    const stored = JSON.parse((await ctx.store.manifestBytes(image.digest))!.toString()) as ImageManifest
    const forged = Buffer.from(JSON.stringify({ ...stored, cmdline: 'init=/bin/sh' }))
    const forgingPeerStandIn = await standInPeer(t, (_url, res) => res.end(forged))
    const b = await freshStore(t)
    await rejectsWith(new ImageFetcher({ images: b, log }).ensure(image.digest, [forgingPeerStandIn]),
      'UIG_ERR_IMAGE_DIGEST_MISMATCH', 'content has digest')
    assert.deepEqual(await storeContents(b), [])
  })

  test('peers answering garbage, an endless body or nothing: UIG_ERR_IMAGE_FETCH_FAILED naming each', async (t) => {
    const garbagePeerStandIn = await standInPeer(t, (_url, res) => res.end('<html>not a manifest</html>'))
    const endlessPeerStandIn = await standInPeer(t, (_url, res) => {
      const chunk = Buffer.alloc(64 * 1024, 0x20)
      const pump = (): void => { while (res.write(chunk)); res.once('drain', pump) }
      res.on('close', () => res.removeAllListeners('drain'))
      pump()
    })
    const silentPeerStandIn = await standInPeer(t, () => {})
    const b = await freshStore(t)
    const started = performance.now()
    await rejectsWith(new ImageFetcher({ images: b, log, timeoutMs: 500 }).ensure(image.digest, [garbagePeerStandIn, endlessPeerStandIn, silentPeerStandIn]),
      'UIG_ERR_IMAGE_FETCH_FAILED', `${garbagePeerStandIn}: its manifest answer is not JSON`, `${endlessPeerStandIn}: its manifest answer is longer`, `${silentPeerStandIn}: no answer within 500 ms`)
    assert.ok(performance.now() - started < 5000)
    assert.deepEqual(await storeContents(b), [])
    await rejectsWith(new ImageFetcher({ images: b, log }).ensure(image.digest, []), 'UIG_ERR_IMAGE_FETCH_FAILED', 'no peer')
  })

  test('a peer that lacks the image, or is asked without the token, says so in the failure', async (t) => {
    const b = await freshStore(t)
    const absent = `sha256:${'0'.repeat(64)}`
    await rejectsWith(new ImageFetcher({ images: b, token: TOKEN, log }).ensure(absent, [peer.url]), 'UIG_ERR_IMAGE_FETCH_FAILED', 'HTTP 404: UIG_ERR_IMAGE_NOT_FOUND')
    await rejectsWith(new ImageFetcher({ images: b, log }).ensure(image.digest, [peer.url]), 'UIG_ERR_IMAGE_FETCH_FAILED', 'HTTP 401: UIG_ERR_API_UNAUTHORIZED')
    await rejectsWith(new ImageFetcher({ images: b, log }).ensure('sha256:ABC', [peer.url]), 'UIG_ERR_IMAGE_INVALID_NAME')
  })

  test('the routes serve the manifest\'s stored bytes and the blob with its length; a bad digest is a 400', async () => {
    const get = async (path: string): Promise<Response> => await fetch(`${peer.url}${path}`, { headers: { authorization: `Bearer ${TOKEN}` } })
    const manifest = await get(`/v1/cluster/images/${image.digest}`)
    assert.equal(manifest.status, 200)
    assert.ok(Buffer.from(await manifest.arrayBuffer()).equals((await ctx.store.manifestBytes(image.digest))!))
    const blob = await get(`/v1/cluster/blobs/${image.rootfs!.digest}`)
    assert.equal(blob.status, 200)
    assert.equal(blob.headers.get('content-length'), String(image.rootfs!.size))
    assert.equal(Buffer.from(await blob.arrayBuffer()).length, image.rootfs!.size)
    const missing = await get(`/v1/cluster/blobs/sha256:${'0'.repeat(64)}`)
    assert.equal(missing.status, 404)
    assert.equal(((await missing.json()) as { code: string }).code, 'UIG_ERR_IMAGE_NOT_FOUND')
    const hex = image.digest.slice(7)
    for (const bad of [
      `sha256:${hex.toUpperCase()}`, hex, `sha256:${hex}0`, `sha512:${hex}`, '..%2F..%2Fmanifests', `sha256:..%2F${hex.slice(5)}`, `sha256:${hex}%00`
    ]) {
      for (const kind of ['images', 'blobs']) {
        const res = await get(`/v1/cluster/${kind}/${bad}`)
        assert.equal(res.status, 400, `${kind}/${bad}`)
        assert.equal(((await res.json()) as { code: string }).code, 'UIG_ERR_API_VALIDATION')
      }
    }
  })
})
