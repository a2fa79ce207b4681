import assert from 'node:assert/strict'
import { createWriteStream } from 'node:fs'
import { readFile, readdir } from 'node:fs/promises'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { after, before, describe, it } from 'node:test'
import tar from 'tar-stream'
import { run } from '../../src/core/exec.js'
import type { ImageManifest } from '../../src/core/image.js'
import { waitForAppAnswer, type AppAnswer } from '../../src/core/app-probe.js'
import type { Vm } from '../../src/core/vm.js'
import { BlobCache } from '../../src/oci/blob-cache.js'
import { readImageArchive } from '../../src/oci/image-archive.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { createTestContext, runCli, type TestContext } from '../helpers/fixtures.js'
import { buildImage, busyboxLayer, createLayout, type OciLayout } from '../helpers/oci-images.js'

/** Writes a tar of our own making: entries in order, with whatever names (a `../` one included). */
async function writeTar (path: string, entries: Array<{ name: string, data: string | Buffer }>): Promise<void> {
  const pack = tar.pack()
  const done = pipeline(pack as unknown as NodeJS.ReadableStream, createWriteStream(path))
  for (const e of entries) {
    await new Promise<void>((resolve, reject) => { pack.entry({ name: e.name }, e.data, (err) => { if (err != null) reject(err); else resolve() }) })
  }
  pack.finalize()
  await done
}

/** The files of an OCI layout directory, as tar entries (to copy it into an archive with one changed). */
async function layoutEntries (dir: string): Promise<Array<{ name: string, data: Buffer }>> {
  const blobs = await readdir(join(dir, 'blobs', 'sha256'))
  return [
    { name: 'oci-layout', data: await readFile(join(dir, 'oci-layout')) },
    { name: 'index.json', data: await readFile(join(dir, 'index.json')) },
    ...await Promise.all(blobs.map(async (b) => ({ name: `blobs/sha256/${b}`, data: await readFile(join(dir, 'blobs', 'sha256', b)) })))
  ]
}

/**
 * `uigniter image import`: an image made with umoci, then written by skopeo
 * as a docker archive and as an OCI archive, imported from each (and from the
 * layout directory itself); the docker one boots and serves as the image's
 * user. Bad archives are refused, each with its code. One VM.
 */
describe('image import: OCI layouts and docker archives', { timeout: 300_000 }, () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let layout: OciLayout
  let daemon: DaemonProcess | undefined
  let dockerTar: string
  let ociTar: string

  const APP = 'mkdir -p /tmp/www && cp -r /www/. /tmp/www/ && id > /tmp/www/id && exec /bin/busybox httpd -f -p 8080 -h /tmp/www'

  before(async () => {
    ctx = await createTestContext()
    layout = await createLayout()
    await buildImage(layout, 'v1', [
      {
        ...await busyboxLayer(),
        'etc/passwd': 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n',
        'etc/group': 'root:x:0:\napp:x:1000:\n',
        'www/index.html': 'imported and running\n'
      },
      { 'www/second': 'from the second layer\n' }
    ], { entrypoint: ['/bin/busybox', 'sh', '-c', APP], user: 'app', ports: ['8080/tcp'] })
    dockerTar = join(ctx.dataDir, 'web-docker.tar')
    ociTar = join(ctx.dataDir, 'web-oci.tar')
    await run('skopeo', ['copy', '--quiet', `oci:${layout.dir}:v1`, `docker-archive:${dockerTar}:web:1`])
    await run('skopeo', ['copy', '--quiet', `oci:${layout.dir}:v1`, `oci-archive:${ociTar}:v1`])
  })

  after(async () => {
    await daemon?.removeEverything()
    await layout?.close()
    await ctx?.cleanup()
  })

  const importCli = async (args: string[]): Promise<ImageManifest> => {
    const out = await runCli(['image', 'import', ...args, '--json'], { env: ctx.env })
    assert.equal(out.code, 0, out.stderr)
    return JSON.parse(out.stdout) as ImageManifest
  }
  const checkManifest = (m: ImageManifest, name: string, reference: string): void => {
    assert.equal(`${m.name}:${m.tag}`, name)
    assert.deepEqual(m.user, { uid: 1000, gid: 1000 })
    assert.deepEqual(m.ports, [{ port: 8080, protocol: 'tcp' }])
    assert.equal(m.origin?.reference, reference)
    assert.equal(m.origin?.layers.length, 2)
    assert.match(m.origin?.manifestDigest ?? '', /^sha256:[0-9a-f]{64}$/)
    assert.equal(m.overlaySizeMiB, 256)
  }

  it('imports the OCI layout directory', async () => {
    checkManifest(await importCli([layout.dir, '-t', 'web-dir:1']), 'web-dir:1', 'archive:layout:v1')
  })

  it('imports the OCI archive (a tar of a layout), named after the archive and its ref.name', async () => {
    checkManifest(await importCli([ociTar]), 'web-oci:v1', 'archive:web-oci.tar:v1')
  })

  it('imports the docker archive under its RepoTag and runs it as the image\'s user', async () => {
    checkManifest(await importCli([dockerTar]), 'web:1', 'archive:web-docker.tar:docker.io/library/web:1')
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.239.${Math.floor(Math.random() * 200)}.0/24` })
    await daemon.start()
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'web:1', name: 'web' })
    assert.equal(vm.state, 'running')
    const get = async (path: string): Promise<AppAnswer> => await waitForAppAnswer({ host: vm.ipAddress ?? '', port: 8080, httpPath: path, anyStatus: true }, 60_000)
    assert.deepEqual(await get('/index.html'), { status: 200, body: 'imported and running\n' })
    assert.deepEqual(await get('/second'), { status: 200, body: 'from the second layer\n' })
    assert.match((await get('/id')).body, /^uid=1000\(app\) gid=1000\(app\)/)
  })

  it('refuses an archive with a ../ entry', async () => {
    const bad = join(ctx.dataDir, 'dotdot.tar')
    await writeTar(bad, [...await layoutEntries(layout.dir), { name: '../escape', data: 'x' }])
    await assert.rejects(readImageArchive(bad, { dataDir: ctx.dataDir }), { code: 'UIG_ERR_OCI_LAYER_UNSAFE', message: /"\.\.\/escape".*\.\./ })
  })

  it('refuses a blob whose content does not match its name, and keeps nothing of it', async () => {
    const entries = await layoutEntries(layout.dir)
    const largest = entries.reduce((a, b) => (b.data.length > a.data.length ? b : a))
    const tampered = Buffer.from(largest.data)
    tampered[tampered.length - 1] = (tampered.at(-1) ?? 0) ^ 0xff
    const bad = join(ctx.dataDir, 'tampered.tar')
    await writeTar(bad, entries.map((e) => (e === largest ? { name: e.name, data: tampered } : e)))
    const dataDir = join(ctx.dataDir, 'tampered-cache')
    await assert.rejects(readImageArchive(bad, { dataDir }), { code: 'UIG_ERR_IMAGE_DIGEST_MISMATCH' })
    assert.equal(await new BlobCache(dataDir).has(`sha256:${largest.name.slice('blobs/sha256/'.length)}`), false)
  })

  it('refuses a docker archive whose manifest.json names a missing layer', async () => {
    const config = JSON.stringify({ architecture: 'amd64', os: 'linux', config: {}, rootfs: { type: 'layers', diff_ids: [`sha256:${'0'.repeat(64)}`] } })
    const bad = join(ctx.dataDir, 'missing-layer.tar')
    await writeTar(bad, [
      { name: 'config.json', data: config },
      { name: 'manifest.json', data: JSON.stringify([{ Config: 'config.json', RepoTags: ['broken:1'], Layers: ['gone/layer.tar'] }]) }
    ])
    await assert.rejects(readImageArchive(bad, { dataDir: ctx.dataDir }), { code: 'UIG_ERR_OCI_NOT_FOUND', message: /gone\/layer\.tar/ })
    // Through the CLI too: the code is what the user sees.
    const out = await runCli(['image', 'import', bad], { env: ctx.env })
    assert.equal(out.code, 1)
    assert.match(out.stderr, /UIG_ERR_OCI_NOT_FOUND/)
  })
})
