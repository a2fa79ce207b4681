import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import { waitForAppAnswer, type AppAnswer } from '../../src/core/app-probe.js'
import type { Vm } from '../../src/core/vm.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { createTestContext, runCli, type TestContext } from '../helpers/fixtures.js'
import { buildImage, busyboxLayer, createLayout, pushImage, type OciLayout } from '../helpers/oci-images.js'
import { startRegistry, type TestRegistry } from '../helpers/oci-registry.js'

/**
 * An image pulled from a real registry (Debian's docker-registry) and run:
 * two layers, the second deleting a file of the first (a whiteout), a User
 * from the image's own /etc/passwd, exposed ports. `uigniter image pull`
 * makes a bootable image of it; a VM of it serves HTTP as that user, without
 * the deleted file. One VM.
 */
describe('an OCI image pulled from a registry, then run', { timeout: 300_000 }, () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let registry: TestRegistry
  let layout: OciLayout
  let daemon: DaemonProcess

  // The app: what it is (id) and the files it was given, served by busybox's httpd from a copy in /tmp.
  const APP = 'mkdir -p /tmp/www && cp -r /www/. /tmp/www/ && id > /tmp/www/id && exec /bin/busybox httpd -f -p 8080 -h /tmp/www'

  before(async () => {
    ctx = await createTestContext()
    registry = await startRegistry()
    layout = await createLayout()
    await buildImage(layout, 'v1', [
      {
        ...await busyboxLayer(),
        'bin/sh': { data: '#!/bin/busybox sh\nexec /bin/busybox sh "$@"\n', mode: 0o755 },
        'etc/passwd': 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n',
        'etc/group': 'root:x:0:\napp:x:1000:\n',
        'www/index.html': 'pulled and running\n',
        'www/secret': 'this file is deleted by the second layer\n'
      },
      { 'www/secret': null }
    ], { entrypoint: ['/bin/busybox', 'sh', '-c', APP], user: 'app', ports: ['8080/tcp'] })
    await pushImage(layout, 'v1', registry.host, 'test/web:1')
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.238.${Math.floor(Math.random() * 200)}.0/24` })
  })

  after(async () => {
    await daemon?.removeEverything()
    await layout?.close()
    await registry?.close()
    await ctx?.cleanup()
  })

  it('pulls the image into a bootable one that records where it came from', async () => {
    const pulled = await runCli(['image', 'pull', '--insecure', `${registry.host}/test/web:1`, '--json'], { env: ctx.env })
    assert.equal(pulled.code, 0, pulled.stderr)
    const manifest = JSON.parse(pulled.stdout) as ImageManifest
    assert.equal(`${manifest.name}:${manifest.tag}`, 'web:1')
    assert.equal(manifest.format, 'squashfs')
    assert.deepEqual(manifest.user, { uid: 1000, gid: 1000 })
    assert.deepEqual(manifest.ports, [{ port: 8080, protocol: 'tcp' }])
    assert.equal(manifest.origin?.reference, `${registry.host}/test/web:1`)
    assert.equal(manifest.origin?.layers.length, 2)
    assert.match(manifest.origin?.manifestDigest ?? '', /^sha256:[0-9a-f]{64}$/)
    assert.equal(manifest.overlaySizeMiB, 256)
    // Pulled again: every layer is in the cache, nothing is fetched, and the image made from this manifest is kept.
    // Named in the config's plain-HTTP registries, it needs no --insecure; named nowhere, the pull tries https and says what to do.
    const https = await runCli(['image', 'pull', `${registry.host}/test/web:1`], { env: ctx.env })
    assert.equal(https.code, 1)
    assert.match(https.stderr, /error UIG_ERR_OCI_REGISTRY: registry .* cannot be reached at https:.*--insecure, or its host:port in the config's registries\.insecure/)
    const again = await runCli(['image', 'pull', `${registry.host}/test/web:1`], { env: { ...ctx.env, UIGNITER_INSECURE_REGISTRIES: `localhost:5000,${registry.host}` } })
    assert.equal(again.code, 0, again.stderr)
    assert.match(again.stdout, /: 0 fetched, \d+ cached\) as web:1, already made from this manifest/)
    // Asked for another overlay, it is made again.
    const remade = await runCli(['image', 'pull', '--insecure', '--overlay', '128M', `${registry.host}/test/web:1`, '--json'], { env: ctx.env })
    assert.equal(remade.code, 0, remade.stderr)
    assert.equal((JSON.parse(remade.stdout) as ImageManifest).overlaySizeMiB, 128)
    const back = await runCli(['image', 'pull', '--insecure', '--overlay', '256M', `${registry.host}/test/web:1`], { env: ctx.env })
    assert.equal(back.code, 0, back.stderr)
  })

  it('runs it as the image\'s user, without the file the second layer deleted', async () => {
    await daemon.start()
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'web:1', name: 'web' })
    assert.equal(vm.state, 'running')
    const get = async (path: string): Promise<AppAnswer> => await waitForAppAnswer({ host: vm.ipAddress ?? '', port: 8080, httpPath: path, anyStatus: true }, 60_000)
    assert.deepEqual(await get('/index.html'), { status: 200, body: 'pulled and running\n' })
    assert.match((await get('/id')).body, /^uid=1000\(app\) gid=1000\(app\)/)
    assert.equal((await get('/secret')).status, 404)
  })

  it('refuses a registry that answers 401 to a pull without credentials, with its code', async () => {
    const locked = await startRegistry({ auth: { username: 'user', password: 'secret-password' } })
    try {
      const refused = await runCli(['image', 'pull', '--insecure', `${locked.host}/test/web:1`], { env: ctx.env })
      assert.equal(refused.code, 1)
      assert.match(refused.stderr, /error UIG_ERR_[A-Z_]+: .*401|error UIG_ERR_OCI_AUTH/)
      // The config's credentials file is used when the command names none: a wrong password is refused, the right one gets past the 401.
      const dir = await mkdtemp(join(tmpdir(), 'uigniter-creds-'))
      const file = async (password: string): Promise<string> => {
        const path = join(dir, `${password}.json`)
        await writeFile(path, JSON.stringify({ auths: { [locked.host]: { auth: Buffer.from(`user:${password}`).toString('base64') } } }))
        return path
      }
      const wrong = await runCli(['image', 'pull', '--insecure', `${locked.host}/test/web:1`], { env: { ...ctx.env, UIGNITER_REGISTRY_CREDENTIALS: await file('wrong') } })
      assert.equal(wrong.code, 1)
      assert.match(wrong.stderr, /error UIG_ERR_OCI_AUTH: .*refused the credentials/)
      const right = await runCli(['image', 'pull', '--insecure', `${locked.host}/test/web:1`], { env: { ...ctx.env, UIGNITER_REGISTRY_CREDENTIALS: await file('secret-password') } })
      assert.equal(right.code, 1)
      assert.match(right.stderr, /error UIG_ERR_OCI_NOT_FOUND: /, 'authenticated: the registry says the image is not there')
      await rm(dir, { recursive: true, force: true })
    } finally {
      await locked.close()
    }
  })
})
