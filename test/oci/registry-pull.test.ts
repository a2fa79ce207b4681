import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { BlobCache } from '../../src/oci/blob-cache.js'
import { mediaTypes } from '../../src/oci/media-types.js'
import { OciError } from '../../src/oci/oci-errors.js'
import { pull, type PullOptions } from '../../src/oci/pull.js'
import { busyboxLayer, buildImage, createLayout, getManifest, pushImage, putManifest, type OciLayout } from '../helpers/oci-images.js'
import { startBearerGate, startCuttingProxy, startRegistry, type TestRegistry } from '../helpers/oci-registry.js'
import { RegistryClient } from '../../src/oci/registry-client.js'

const user = { username: 'ann', password: 'open sesame' }

async function sha256File (path: string): Promise<string> {
  return `sha256:${createHash('sha256').update(await readFile(path)).digest('hex')}`
}

async function listOrEmpty (dir: string): Promise<string[]> {
  try { return await readdir(dir) } catch { return [] }
}

async function freshDataDir (): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'uigniter-pull-'))
  after(async () => { await rm(dir, { recursive: true, force: true }) })
  return dir
}

function isOci (reason: string) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof OciError, `expected an OciError, got ${String(err)}`)
    assert.equal(err.reason, reason, err.message)
    return true
  }
}

describe('pull from a real registry (docker-registry 2.8)', { timeout: 180_000 }, () => {
  let registry: TestRegistry
  let layout: OciLayout
  let opts: (dataDir: string) => PullOptions

  before(async () => {
    registry = await startRegistry()
    layout = await createLayout()
    await buildImage(layout, 'base', [await busyboxLayer()])
    await buildImage(layout, 'app', [{ 'etc/app.txt': 'app\n' }], { from: 'base', entrypoint: ['/bin/busybox', 'sh'] })
    await buildImage(layout, 'other', [{ 'etc/other.txt': 'other\n' }], { from: 'base' })
    await buildImage(layout, 'tamper', [{ 'etc/tamper.txt': 'x'.repeat(4096) }], { from: 'base' })
    await pushImage(layout, 'app', registry.host, 'test/app:v1')
    await pushImage(layout, 'other', registry.host, 'test/other:v1')
    await pushImage(layout, 'app', registry.host, 'test/docker:v1', { format: 'v2s2' })
    await pushImage(layout, 'tamper', registry.host, 'test/tamper:v1')
    // Layers of their own: skopeo reuses a blob the registry has rather than recompress it.
    await buildImage(layout, 'zstd', [await busyboxLayer(), { 'etc/zstd.txt': 'zstd\n' }])
    await pushImage(layout, 'zstd', registry.host, 'test/zstd:v1', { compress: 'zstd' })
    opts = (dataDir) => ({ dataDir, insecure: [registry.host], timeoutMs: 10_000 })
  })
  after(async () => {
    await registry?.close()
    await layout?.close()
  })

  test('a two-layer OCI image: manifest, config and layers, each verified and cached by digest', async () => {
    const dataDir = await freshDataDir()
    const progress: string[] = []
    const image = await pull(`${registry.host}/test/app:v1`, { ...opts(dataDir), onProgress: (p) => { if (p.state !== 'downloading') progress.push(`${p.index}:${p.state}`) } })
    const served = await getManifest(registry.host, 'test/app', 'v1', mediaTypes.ociManifest)
    assert.equal(image.manifestDigest, served.digest)
    assert.equal(image.manifestMediaType, mediaTypes.ociManifest)
    assert.equal(image.reference, `${registry.host}/test/app:v1`)
    assert.equal(image.layers.length, 2)
    assert.deepEqual(image.config.config?.Entrypoint, ['/bin/busybox', 'sh'])
    assert.equal(image.config.architecture, 'amd64')
    for (const layer of image.layers) {
      assert.equal(layer.mediaType, 'application/vnd.oci.image.layer.v1.tar+gzip')
      assert.equal(layer.compression, 'gzip')
      assert.equal(layer.path, join(dataDir, 'oci/blobs/sha256', layer.digest.slice(7)))
      assert.equal(await sha256File(layer.path), layer.digest)
      assert.equal((await stat(layer.path)).size, layer.size)
    }
    assert.deepEqual(image.stats, { fetched: 3, cached: 0, resumed: 0 })
    assert.deepEqual(progress.sort(), ['0:done', '1:done'])
    // The manifest is kept too, under its digest, for image inspect.
    assert.equal(await sha256File(new BlobCache(dataDir).path(image.manifestDigest)), image.manifestDigest)
  })

  test('Docker schema 2, by digest', async () => {
    const dataDir = await freshDataDir()
    const served = await getManifest(registry.host, 'test/docker', 'v1', mediaTypes.dockerManifest)
    assert.equal(served.mediaType, mediaTypes.dockerManifest)
    const image = await pull(`${registry.host}/test/docker@${served.digest}`, opts(dataDir))
    assert.equal(image.manifestDigest, served.digest)
    assert.equal(image.manifestMediaType, mediaTypes.dockerManifest)
    assert.deepEqual(image.layers.map(l => l.mediaType), Array(2).fill('application/vnd.docker.image.rootfs.diff.tar.gzip'))
  })

  test('an index: the linux/amd64 manifest is taken, not the arm64 one', async () => {
    const dataDir = await freshDataDir()
    await buildImage(layout, 'arm', [{ 'etc/arm.txt': 'arm\n' }], { from: 'base' })
    const { run } = await import('../../src/core/exec.js')
    await run('umoci', ['config', '--image', `${layout.dir}:arm`, '--architecture', 'arm64'])
    await pushImage(layout, 'arm', registry.host, 'test/multi:arm64')
    await pushImage(layout, 'app', registry.host, 'test/multi:amd64')
    const arm = await getManifest(registry.host, 'test/multi', 'arm64', mediaTypes.ociManifest)
    const x86 = await getManifest(registry.host, 'test/multi', 'amd64', mediaTypes.ociManifest)
    const index = JSON.stringify({
      schemaVersion: 2,
      mediaType: mediaTypes.ociIndex,
      manifests: [
        { mediaType: mediaTypes.ociManifest, digest: arm.digest, size: arm.body.length, platform: { os: 'linux', architecture: 'arm64' } },
        { mediaType: mediaTypes.ociManifest, digest: x86.digest, size: x86.body.length, platform: { os: 'linux', architecture: 'amd64' } }
      ]
    })
    await putManifest(registry.host, 'test/multi', 'v1', mediaTypes.ociIndex, index)
    const image = await pull(`${registry.host}/test/multi:v1`, opts(dataDir))
    assert.equal(image.manifestDigest, x86.digest)
    assert.equal(image.indexDigest, `sha256:${createHash('sha256').update(index).digest('hex')}`)
    assert.equal(image.config.architecture, 'amd64')
    // A single-platform image for another CPU is refused before its layers are fetched.
    await assert.rejects(pull(`${registry.host}/test/multi:arm64`, opts(dataDir)), isOci('manifest-unsupported'))
  })

  test('a layer shared by two images is fetched and stored once', async () => {
    const dataDir = await freshDataDir()
    const cache = new BlobCache(dataDir)
    const [app, other] = await Promise.all([
      pull(`${registry.host}/test/app:v1`, { ...opts(dataDir), cache }),
      pull(`${registry.host}/test/other:v1`, { ...opts(dataDir), cache })
    ])
    assert.equal(app.layers[0]?.digest, other.layers[0]?.digest, 'the busybox base layer is the same blob')
    assert.notEqual(app.layers[1]?.digest, other.layers[1]?.digest)
    // Pulled at the same time: one of the two pulls downloaded the base layer, the other waited for it.
    assert.equal(app.stats.fetched + other.stats.fetched, 5, `${JSON.stringify(app.stats)} ${JSON.stringify(other.stats)}`)
    const blobs = await readdir(join(dataDir, 'oci/blobs/sha256'))
    // 2 configs + 3 distinct layers + 2 manifests.
    assert.equal(blobs.length, 7)
    const again = await pull(`${registry.host}/test/other:v1`, opts(dataDir))
    assert.deepEqual(again.stats, { fetched: 0, cached: 3, resumed: 0 })
  })

  test('a tampered blob is refused and nothing of it is stored', async () => {
    const dataDir = await freshDataDir()
    const served = JSON.parse((await getManifest(registry.host, 'test/tamper', 'v1', mediaTypes.ociManifest)).body.toString()) as { layers: Array<{ digest: string, size: number }> }
    const top = served.layers[1]
    assert.ok(top !== undefined)
    const file = registry.blobFile(top.digest)
    const bytes = await readFile(file)
    bytes[bytes.length >> 1] = (bytes[bytes.length >> 1] ?? 0) ^ 0xff
    await writeFile(file, bytes)
    await assert.rejects(pull(`${registry.host}/test/tamper:v1`, opts(dataDir)), (err: unknown) => {
      isOci('digest-mismatch')(err)
      assert.equal((err as OciError).code, 'UIG_ERR_IMAGE_DIGEST_MISMATCH')
      assert.match((err as Error).message, new RegExp(top.digest))
      return true
    })
    const cache = new BlobCache(dataDir)
    assert.equal(await cache.has(top.digest), false)
    assert.deepEqual(await listOrEmpty(join(dataDir, 'oci/partial')), [])
  })

  test('an unknown layer media type is refused before anything is downloaded', async () => {
    const dataDir = await freshDataDir()
    const served = JSON.parse((await getManifest(registry.host, 'test/app', 'v1', mediaTypes.ociManifest)).body.toString()) as { layers: Array<{ mediaType: string }> }
    const layer = served.layers[1]
    assert.ok(layer !== undefined)
    layer.mediaType = 'application/vnd.example.unknown.layer.v1'
    await putManifest(registry.host, 'test/app', 'weird', mediaTypes.ociManifest, JSON.stringify(served))
    await assert.rejects(pull(`${registry.host}/test/app:weird`, opts(dataDir)), (err: unknown) => {
      isOci('manifest-unsupported')(err)
      assert.match((err as Error).message, /application\/vnd\.example\.unknown\.layer\.v1/)
      return true
    })
    assert.deepEqual(await listOrEmpty(join(dataDir, 'oci/blobs/sha256')), [])
  })

  test('a pull cut in the middle, pulled again, fetches only the rest of the broken layer', async (t) => {
    const dataDir = await freshDataDir()
    const proxy = await startCuttingProxy(registry)
    t.after(proxy.close)
    const served = JSON.parse((await getManifest(registry.host, 'test/app', 'v1', mediaTypes.ociManifest)).body.toString()) as { layers: Array<{ digest: string, size: number }> }
    const big = served.layers[0]
    assert.ok(big !== undefined && big.size > 600_000, 'the busybox layer is the big one')
    proxy.cut = { digest: big.digest, afterBytes: 300_000 }
    const options = { dataDir, insecure: [proxy.host], timeoutMs: 10_000 }
    await assert.rejects(pull(`${proxy.host}/test/app:v1`, options), isOci('registry'))
    const cache = new BlobCache(dataDir)
    assert.equal(await cache.has(big.digest), false, 'the broken layer is not in the cache')
    assert.equal(await cache.has(served.layers[1]?.digest ?? ''), true, 'the complete layer is')
    const partialSize = (await stat(cache.partialPath(big.digest))).size
    assert.ok(partialSize > 0 && partialSize <= 300_000, `partial ${partialSize}`)

    proxy.cut = undefined
    proxy.requests.length = 0
    const image = await pull(`${proxy.host}/test/app:v1`, options)
    const blobRequests = proxy.requests.filter(r => r.path.includes('/blobs/'))
    assert.deepEqual(blobRequests.map(r => [r.path.split('/').pop(), r.range, r.status]), [[big.digest, `bytes=${partialSize}-`, 206]])
    assert.deepEqual(image.stats, { fetched: 1, cached: 2, resumed: 1 })
    assert.equal(await sha256File(image.layers[0]?.path ?? ''), big.digest)
    assert.deepEqual(await listOrEmpty(join(dataDir, 'oci/partial')), [])
  })

  test('zstd layers', async () => {
    const dataDir = await freshDataDir()
    const image = await pull(`${registry.host}/test/zstd:v1`, opts(dataDir))
    assert.deepEqual(image.layers.map(l => [l.mediaType, l.compression]), Array(2).fill(['application/vnd.oci.image.layer.v1.tar+zstd', 'zstd']))
    const first = await readFile(image.layers[0]?.path ?? '')
    assert.equal(first.readUInt32LE(0), 0xfd2fb528, 'a zstd frame')
  })

  test('bearer tokens through the WWW-Authenticate challenge, one per scope (a stand-in token service)', async (t) => {
    const dataDir = await freshDataDir()
    const gate = await startBearerGate(registry, { credentials: user })
    t.after(gate.close)
    const client = new RegistryClient({ registry: gate.host, insecure: true, credentials: user, timeoutMs: 10_000 })
    const image = await pull(`${gate.host}/test/app:v1`, { dataDir, client })
    assert.equal(image.layers.length, 2)
    // One token for repository:test/app:pull, reused for the manifest, the config and both layers.
    assert.deepEqual(gate.tokenRequests, [{ scope: 'repository:test/app:pull', ok: true }])
    assert.equal(client.requests.tokens, 1)
    await pull(`${gate.host}/test/other:v1`, { dataDir, client })
    assert.deepEqual(gate.tokenRequests.map(r => r.scope), ['repository:test/app:pull', 'repository:test/other:pull'])

    const wrong = new RegistryClient({ registry: gate.host, insecure: true, credentials: { ...user, password: 'wrong' }, timeoutMs: 10_000 })
    await assert.rejects(pull(`${gate.host}/test/app:v1`, { dataDir, client: wrong }), (err: unknown) => {
      isOci('auth')(err)
      assert.equal((err as OciError).httpStatus, 401)
      assert.match((err as Error).message, /token service.*refused the credentials of ann/)
      return true
    })
  })

  test('anonymous bearer tokens, as Docker Hub gives for public images', async (t) => {
    const dataDir = await freshDataDir()
    const gate = await startBearerGate(registry, { anonymous: true })
    t.after(gate.close)
    const image = await pull(`${gate.host}/test/app:v1`, { dataDir, insecure: true, timeoutMs: 10_000 })
    assert.equal(image.layers.length, 2)
    assert.equal(gate.tokenRequests.length, 1)
  })

  test('https unless the registry is named insecure', async () => {
    const dataDir = await freshDataDir()
    await assert.rejects(pull(`${registry.host}/test/app:v1`, { dataDir, timeoutMs: 5000 }), (err: unknown) => {
      isOci('registry')(err)
      assert.match((err as Error).message, /insecure/)
      return true
    })
  })

  test('a name the registry does not have', async () => {
    const dataDir = await freshDataDir()
    await assert.rejects(pull(`${registry.host}/test/missing:v1`, opts(dataDir)), (err: unknown) => {
      isOci('not-found')(err)
      assert.equal((err as OciError).httpStatus, 404)
      return true
    })
  })
})

describe('pull from a registry with basic auth (htpasswd)', { timeout: 120_000 }, () => {
  let registry: TestRegistry
  let layout: OciLayout

  before(async () => {
    registry = await startRegistry({ auth: user })
    layout = await createLayout()
    await buildImage(layout, 'app', [await busyboxLayer(), { 'etc/app.txt': 'app\n' }])
    await pushImage(layout, 'app', registry.host, 'private/app:v1', { auth: user })
  })
  after(async () => {
    await registry?.close()
    await layout?.close()
  })

  const configJson = async (dataDir: string, password: string): Promise<string> => {
    const path = join(dataDir, 'config.json')
    const auth = Buffer.from(`${user.username}:${password}`).toString('base64')
    await writeFile(path, JSON.stringify({ auths: { [`http://${registry.host}`]: { auth }, 'other.example': { auth: 'eDp5' } } }))
    return path
  }

  test('with the credentials of a config.json file', async () => {
    const dataDir = await freshDataDir()
    const image = await pull(`${registry.host}/private/app:v1`, { dataDir, insecure: true, credentialsFile: await configJson(dataDir, user.password), timeoutMs: 10_000 })
    assert.equal(image.layers.length, 2)
    assert.equal(await sha256File(image.layers[1]?.path ?? ''), image.layers[1]?.digest)
  })

  test('without credentials: the 401, with its code', async () => {
    const dataDir = await freshDataDir()
    await assert.rejects(pull(`${registry.host}/private/app:v1`, { dataDir, insecure: true, timeoutMs: 10_000 }), (err: unknown) => {
      isOci('auth')(err)
      assert.equal((err as OciError).code, 'UIG_ERR_OCI_AUTH')
      assert.equal((err as OciError).httpStatus, 401)
      assert.match((err as Error).message, /401 Unauthorized.*none were given/)
      return true
    })
    assert.deepEqual(await listOrEmpty(join(dataDir, 'oci/blobs/sha256')), [])
  })

  test('with a wrong password', async () => {
    const dataDir = await freshDataDir()
    await assert.rejects(pull(`${registry.host}/private/app:v1`, { dataDir, insecure: true, credentialsFile: await configJson(dataDir, 'wrong'), timeoutMs: 10_000 }), (err: unknown) => {
      isOci('auth')(err)
      assert.match((err as Error).message, /refused the credentials/)
      return true
    })
  })
})
