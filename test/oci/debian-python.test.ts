import assert from 'node:assert/strict'
import { request } from 'node:http'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import { isRegistryReference } from '../../src/cli/image-commands.js'
import type { ImageManifest } from '../../src/core/image.js'
import type { ServiceStatus } from '../../src/core/service.js'
import { closeDebianLayout, PYTHON_INDEX, PYTHON_PORT, PYTHON_USER, pushDebianImage } from '../helpers/debian-image.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { createTestContext, runCli, type TestContext } from '../helpers/fixtures.js'
import { startRegistry, type TestRegistry } from '../helpers/oci-registry.js'

/** GET through the gateway's HTTP port with the service's name as Host, as a caller that knows only the name would. */
async function getByHost (port: number, host: string, path: string): Promise<{ status: number, body: string }> {
  return await new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, headers: { host }, timeout: 30_000 }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { body += c })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
      res.on('error', reject)
    })
    req.on('timeout', () => req.destroy(new Error(`GET ${path} (Host ${host}) timed out`)))
    req.on('error', reject)
    req.end()
  })
}

describe('which images an application file names by registry reference', () => {
  it('takes a first component with a dot, a port or localhost as a registry; local names stay local', () => {
    for (const ref of ['localhost:5000/redis:7', '127.0.0.1:5000/python:bookworm', 'registry.example.com/team/api:1.2', 'localhost/x', 'ghcr.io/a/b@sha256:' + 'a'.repeat(64)]) {
      assert.equal(isRegistryReference(ref), true, ref)
    }
    for (const name of ['redis', 'redis:7', 'team/api', 'team/api:1.2', 'shop-api:latest']) assert.equal(isRegistryReference(name), false, name)
  })
})

/**
 * A real Debian image (debootstrap bookworm with python3, about 100 MB,
 * packed by umoci, pushed by skopeo to Debian's docker-registry) named by
 * its registry reference in an application file: `uigniter up --insecure`
 * pulls it, makes it an image and runs the service; python3 -m
 * http.server answers through the gateway by Host, as the image's User
 * (www-data): the image's entrypoint copies the Uid and Gid lines of its own
 * /proc/PID/status (the process that execs python) into the served
 * directory. `up` again with the same file keeps the image (not made
 * again) and the replica. One VM.
 */
describe('uigniter up with a Debian python image from a registry', { timeout: 1_500_000 }, () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let registry: TestRegistry
  let daemon: DaemonProcess
  let ref: string
  let appFile: string

  before(async () => {
    ctx = await createTestContext()
    registry = await startRegistry()
    // The first run on a machine makes the Debian root (debootstrap: minutes); later runs take it from /var/cache/uigniter/rootfs.
    ref = await pushDebianImage(registry, 'python')
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.236.${Math.floor(Math.random() * 200)}.0/24` })
    await daemon.start()
    appFile = join(ctx.dataDir, 'uigniter.yaml')
    await writeFile(appFile, [
      'app: debian',
      'services:',
      '  - name: pyweb',
      `    image: ${ref}`,
      '    startPath: cold',
      '    resources: { memoryMiB: 256 }',
      `    ports: [{ port: ${PYTHON_PORT}, protocol: http }]`,
      '    healthCheck: { type: http, path: /, intervalMs: 1000, timeoutMs: 3000, unhealthyThreshold: 5 }',
      ''
    ].join('\n'))
  }, { timeout: 1_200_000 })

  after(async () => {
    await daemon?.removeEverything()
    await closeDebianLayout()
    await registry?.close()
    await ctx?.cleanup()
  })

  let first: ImageManifest
  let vmOfFirstUp: string | null | undefined

  it('pulls the image named by its reference, runs it as a service, and it answers through the gateway as its user', { timeout: 600_000 }, async () => {
    const up = await runCli(['up', appFile, '--insecure', '--timeout', '400', '--json'], { env: daemon.env })
    assert.equal(up.code, 0, `${up.stderr}\n${daemon.output.slice(-3000)}`)
    assert.match(up.stderr, /^pulled \S+\/python:bookworm \(sha256:[0-9a-f]{12}, 2 layer\(s\): \d+ fetched, 0 cached\) as python:bookworm in /m)
    const services = JSON.parse(up.stdout) as ServiceStatus[]
    assert.equal(services[0]?.spec.image, 'python:bookworm', 'the daemon got the local name the pull made')
    vmOfFirstUp = services[0]?.endpoints[0]?.vm

    const inspected = await runCli(['image', 'inspect', 'python:bookworm'], { env: daemon.env })
    assert.equal(inspected.code, 0, inspected.stderr)
    first = JSON.parse(inspected.stdout) as ImageManifest
    assert.equal(first.origin?.reference, ref)
    assert.deepEqual(first.user, { uid: PYTHON_USER.uid, gid: PYTHON_USER.gid })
    assert.deepEqual(first.ports, [{ port: PYTHON_PORT, protocol: 'tcp' }])

    const index = await getByHost(daemon.gatewayPort, 'pyweb', '/index.html')
    assert.deepEqual(index, { status: 200, body: PYTHON_INDEX })
    const whoami = await getByHost(daemon.gatewayPort, 'pyweb', '/whoami.txt')
    assert.equal(whoami.status, 200)
    const ids = (line: string): string => `${line}:\t${PYTHON_USER.uid}\t${PYTHON_USER.uid}\t${PYTHON_USER.uid}\t${PYTHON_USER.uid}`
    assert.match(whoami.body, new RegExp(`^${ids('Uid')}$`, 'm'), whoami.body)
    assert.match(whoami.body, new RegExp(`^${ids('Gid')}$`, 'm'), whoami.body)
  })

  it('up again with the same file keeps the image made from the same manifest, and the replica', { timeout: 300_000 }, async () => {
    assert.ok(first !== undefined, 'the first up ran')
    const started = Date.now()
    const again = await runCli(['up', appFile, '--insecure', '--json'], { env: daemon.env })
    const ms = Date.now() - started
    assert.equal(again.code, 0, again.stderr)
    assert.match(again.stderr, /: 0 fetched, \d+ cached\) as python:bookworm, already made from this manifest/)
    const services = JSON.parse(again.stdout) as ServiceStatus[]
    assert.equal(services[0]?.generation, 1, 'nothing the replica runs changed')
    assert.equal(services[0]?.endpoints[0]?.vm, vmOfFirstUp, 'the same replica')
    const inspected = JSON.parse((await runCli(['image', 'inspect', 'python:bookworm'], { env: daemon.env })).stdout) as ImageManifest
    assert.equal(inspected.createdAt, first.createdAt, 'not made again')
    assert.equal(inspected.digest, first.digest)
    // Converting the root takes 10+ s under this kind of machine; checking the manifest takes well under that.
    assert.ok(ms < 15_000, `the second up took ${ms} ms`)
  })

  it('refuses, before pulling anything, two references that would make one local image', { timeout: 60_000 }, async () => {
    const clash = join(ctx.dataDir, 'clash.yaml')
    await writeFile(clash, [
      'app: clash',
      'services:',
      `  - { name: one, image: "${ref}", startPath: cold, ports: [{ port: ${PYTHON_PORT}, protocol: http }] }`,
      `  - { name: two, image: "localhost:1/other/python:bookworm", startPath: cold, ports: [{ port: ${PYTHON_PORT}, protocol: http }] }`,
      ''
    ].join('\n'))
    const refused = await runCli(['up', clash, '--insecure'], { env: daemon.env })
    assert.equal(refused.code, 2, refused.stderr) // the CLI's exit code for a usage error
    assert.match(refused.stderr, /UIG_ERR_CLI_USAGE: .* would both be pulled as the local image python:bookworm/)
    assert.doesNotMatch(refused.stderr, /^pulled /m)
  })
})
