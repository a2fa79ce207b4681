import assert from 'node:assert/strict'
import { chmod, copyFile, mkdir, writeFile } from 'node:fs/promises'
import { request } from 'node:http'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import type { ServerSentEvent } from '../../src/cli/api-client.js'
import type { Vm } from '../../src/core/vm.js'
import type { Volume, VolumeEvent } from '../../src/core/volume.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { createTestContext, runCli, type TestContext } from '../helpers/fixtures.js'

/**
 * The app of the test image (Debian's busybox-static): `write TEXT DIR`
 * writes and fsyncs DIR/note.txt, `read - DIR` prints it, `hold` runs until
 * stopped. Its root is read-only without an overlay, so the mount points
 * /data and /more are in the image.
 */
const VOL_APP = `#!/bin/busybox sh
export PATH=/bin
case "$1" in
  write) echo "$2" > "$3/note.txt" && busybox sync "$3/note.txt" && echo "UIG-WROTE $2" ;;
  read) echo "UIG-READ $(busybox cat "$3/note.txt" 2>&1)" ;;
  hold) echo UIG-HOLDING; exec busybox sleep 600 ;;
  *) echo "UIG-USAGE $1"; exit 2 ;;
esac
`

async function volAppRootfs (dir: string): Promise<string> {
  for (const sub of ['bin', 'data', 'more']) await mkdir(join(dir, sub), { recursive: true })
  await copyFile('/bin/busybox', join(dir, 'bin/busybox'))
  await chmod(join(dir, 'bin/busybox'), 0o755)
  await writeFile(join(dir, 'vol.sh'), VOL_APP, { mode: 0o755 })
  return dir
}

/** A request over the daemon's socket that gives the status too (ApiClient.call gives only the error). */
async function raw (daemon: DaemonProcess, method: string, path: string, body?: unknown): Promise<{ status: number, json: { code?: string } }> {
  return await new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body)
    const req = request({ socketPath: daemon.env.UIGNITER_SOCKET, method, path, headers: payload !== undefined ? { 'content-type': 'application/json' } : {} }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { text += c })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(text) as { code?: string } }))
    })
    req.on('error', reject)
    req.end(payload)
  })
}

describe('volumes through the daemon: the CLI, the API, events and metrics', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let daemon: DaemonProcess
  const subnetByte = 100 + Math.floor(Math.random() * 100)
  const cli = async (...args: string[]): Promise<{ code: number | null, stdout: string, stderr: string }> => await runCli(args, { env: daemon.env })

  before(async () => {
    ctx = await createTestContext()
    const dir = await volAppRootfs(join(ctx.dataDir, 'vol-app-root'))
    await ctx.builder.build({ name: 'vol-app', source: { kind: 'rootfs', dir, entrypoint: '/vol.sh' }, memoryMiB: 64 })
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.248.${subnetByte}.0/24` })
    await daemon.start()
  })

  after(async () => {
    await daemon.removeEverything().catch(() => {})
    await ctx.cleanup()
  })

  test('create, ls, inspect and rm through the CLI; the file is sparse', { timeout: 60_000 }, async () => {
    const created = await cli('volume', 'create', 'vol-a', '--size', '64M', '--label', 'tier=db')
    assert.equal(created.code, 0, created.stderr)
    assert.match(created.stdout, /^NAME\s+SIZE\s+USED\s+ALLOCATED\s+ATTACHED-TO\s+NODE\n/)
    assert.match(created.stdout, /^vol-a\s+64 MiB\s+\S+ \S+\s+\S+ \S+\s+-\s+-$/m)
    assert.equal((await cli('volume', 'create', 'vol-b', '--size', '1G', '--json')).code, 0)

    const ls = await cli('volume', 'ls')
    assert.equal(ls.code, 0, ls.stderr)
    assert.match(ls.stdout, /^vol-a\s+64 MiB/m)
    assert.match(ls.stdout, /^vol-b\s+1\.0 GiB/m)
    const listed = JSON.parse((await cli('volume', 'ls', '--json')).stdout) as Volume[]
    assert.deepEqual(listed.map((v) => v.name).sort(), ['vol-a', 'vol-b'])

    const inspect = await cli('volume', 'inspect', 'vol-b')
    assert.equal(inspect.code, 0, inspect.stderr)
    const volume = JSON.parse(inspect.stdout) as Volume
    assert.equal(volume.sizeMiB, 1024)
    assert.equal(volume.fs, 'ext4')
    assert.deepEqual(volume.attachments, [])
    assert.ok(volume.allocatedBytes > 0 && volume.allocatedBytes < 64 * 1024 * 1024, `a fresh 1 GiB volume takes ${volume.allocatedBytes} bytes on the host`)
    assert.ok(volume.usedBytes !== null && volume.usedBytes < volume.sizeMiB * 1024 * 1024, `used ${String(volume.usedBytes)}`)
    assert.deepEqual((JSON.parse((await cli('volume', 'inspect', 'vol-a')).stdout) as Volume).labels, { tier: 'db' })

    const again = await cli('volume', 'create', 'vol-a', '--size', '64M')
    assert.equal(again.code, 1)
    assert.match(again.stderr, /^error UIG_ERR_VOLUME_EXISTS: /)

    const rm = await cli('volume', 'rm', 'vol-a', 'vol-b')
    assert.equal(rm.code, 0, rm.stderr)
    assert.equal(rm.stdout, 'removed volume vol-a\nremoved volume vol-b\n')
    const gone = await cli('volume', 'inspect', 'vol-a')
    assert.equal(gone.code, 1)
    assert.match(gone.stderr, /^error UIG_ERR_VOLUME_NOT_FOUND: .*vol-a/)
    assert.equal((await cli('volume', 'ls')).stdout.trim(), 'NAME  SIZE  USED  ALLOCATED  ATTACHED-TO  NODE')
  })

  test('bad input is refused with its code: by the CLI (exit 2) and by the API (400)', { timeout: 60_000 }, async () => {
    for (const size of ['0', 'lots', '10K', '-1']) {
      const bad = await cli('volume', 'create', 'vol-bad', `--size=${size}`)
      assert.equal(bad.code, 2, `--size ${size}: ${bad.stderr}`)
      assert.match(bad.stderr, /^error UIG_ERR_CLI_USAGE: --size must be a size like 512M/)
    }
    const noSize = await cli('volume', 'create', 'vol-bad')
    assert.equal(noSize.code, 2)
    assert.match(noSize.stderr, /UIG_ERR_CLI_USAGE: --size is required/)
    const badName = await cli('volume', 'create', 'Bad_Name', '--size', '64M')
    assert.equal(badName.code, 1)
    assert.match(badName.stderr, /^error UIG_ERR_API_VALIDATION: body\/name must match pattern/)

    for (const body of [
      { name: 'vol-bad', sizeMiB: 0 },
      { name: 'vol-bad', sizeMiB: 8 },
      { name: 'vol-bad', sizeMiB: 1.5 },
      { name: 'vol-bad', sizeMiB: 64, colour: 'red' },
      { name: '../etc', sizeMiB: 64 },
      { name: 'vol-bad', sizeMiB: 64, labels: { 'bad key': 'x' } },
      { sizeMiB: 64 }
    ]) {
      const answer = await raw(daemon, 'POST', '/v1/volumes', body)
      assert.equal(answer.status, 400, JSON.stringify(body))
      assert.equal(answer.json.code, 'UIG_ERR_API_VALIDATION', JSON.stringify(answer.json))
    }
    const badPath = await raw(daemon, 'GET', '/v1/volumes/Not%20A%20Name')
    assert.equal(badPath.status, 400)
    assert.deepEqual(await daemon.api.call<Volume[]>('GET', '/v1/volumes'), [], 'nothing was made')
  })

  test('rm of an unknown volume is UIG_ERR_VOLUME_NOT_FOUND (404)', { timeout: 30_000 }, async () => {
    const rm = await cli('volume', 'rm', 'nope')
    assert.equal(rm.code, 1)
    assert.match(rm.stderr, /^error UIG_ERR_VOLUME_NOT_FOUND: no volume is named "nope"/)
    const answer = await raw(daemon, 'DELETE', '/v1/volumes/nope')
    assert.equal(answer.status, 404)
    assert.equal(answer.json.code, 'UIG_ERR_VOLUME_NOT_FOUND')
  })

  test('/metrics has each volume\'s size, allocated and used bytes and attachments; /v1/events has created and deleted', { timeout: 30_000 }, async () => {
    const events: ServerSentEvent[] = []
    const abort = new AbortController()
    const { ended } = await daemon.api.followEvents('/v1/events', (e) => events.push(e), abort.signal)
    try {
      await daemon.api.call('POST', '/v1/volumes', { name: 'vol-m', sizeMiB: 32 })
      const metrics = await daemon.api.call<string>('GET', '/metrics')
      assert.match(metrics, /^uigniter_volume_size_bytes\{volume="vol-m"\} 33554432$/m)
      assert.match(metrics, /^uigniter_volume_allocated_bytes\{volume="vol-m"\} [1-9]\d*$/m)
      assert.match(metrics, /^uigniter_volume_used_bytes\{volume="vol-m"\} [1-9]\d*$/m)
      assert.match(metrics, /^uigniter_volume_attachments\{volume="vol-m"\} 0$/m)
      const openapi = await daemon.api.call<{ paths: Record<string, Record<string, { summary?: string }>> }>('GET', '/openapi.json')
      assert.ok(openapi.paths['/v1/volumes']?.post?.summary !== undefined && openapi.paths['/v1/volumes/{name}']?.delete?.summary !== undefined, 'the routes are in the OpenAPI document')
      const deleted = await daemon.api.call<Volume>('DELETE', '/v1/volumes/vol-m')
      assert.equal(deleted.name, 'vol-m', 'DELETE answers with the volume it deleted')
      assert.doesNotMatch(await daemon.api.call<string>('GET', '/metrics'), /volume="vol-m"/)
      const deadline = Date.now() + 5000
      while (!events.some((e) => e.type === 'volume.deleted') && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50))
    } finally {
      abort.abort()
      await ended
    }
    const mine = events.filter((e) => e.type.startsWith('volume.')).map((e) => ({ type: e.type, volume: (JSON.parse(e.data) as { volume: string }).volume }))
    assert.deepEqual(mine, [{ type: 'volume.created', volume: 'vol-m' }, { type: 'volume.deleted', volume: 'vol-m' }])
  })

  test('run -v NAME:/PATH: what one VM wrote and fsynced, the next VM reads, read-only', { timeout: 240_000 }, async () => {
    assert.equal((await cli('volume', 'create', 'vol-data', '--size', '64M')).code, 0)
    const write = await cli('run', '--name', 'writer', '-v', 'vol-data:/data', 'vol-app', 'write', 'kept-across-vms', '/data')
    assert.equal(write.code, 0, `${write.stdout}\n${write.stderr}`)
    assert.match(write.stdout, /UIG-WROTE kept-across-vms/)
    const read = await cli('run', '--name', 'reader', '-v', 'vol-data:/more:ro', 'vol-app', 'read', '-', '/more')
    assert.equal(read.code, 0, `${read.stdout}\n${read.stderr}`)
    assert.match(read.stdout, /UIG-READ kept-across-vms/)
    const writer = await daemon.api.call<Vm>('GET', '/v1/vms/writer')
    assert.deepEqual(writer.volumes, [{ name: 'vol-data', guestPath: '/data', readOnly: false }])
    const volume = await daemon.api.call<Volume>('GET', '/v1/volumes/vol-data')
    assert.deepEqual(volume.attachments, [], 'VMs that ended hold nothing')
    assert.ok(volume.usedBytes !== null && volume.usedBytes > 0)
  })

  test('an attached volume: rm refused, a second read-write attachment refused, attached and detached events', { timeout: 240_000 }, async () => {
    assert.equal((await cli('volume', 'create', 'vol-held', '--size', '64M')).code, 0)
    const events: ServerSentEvent[] = []
    const vmEvents: ServerSentEvent[] = []
    const abort = new AbortController()
    const { ended } = await daemon.api.followEvents('/v1/events', (e) => events.push(e), abort.signal)
    const ends = [ended]
    try {
      const run = await cli('run', '-d', '--name', 'holder', '-v', 'vol-held:/data', 'vol-app', 'hold')
      assert.equal(run.code, 0, run.stderr)
      const id = run.stdout.trim()
      await daemon.waitForVm(id, ['running'])
      // This VM's stream: its volume's detach, not the volume's deletion (which names no VM).
      const { ended: endedVm } = await daemon.api.followEvents(`/v1/events?vm=${id}`, (e) => vmEvents.push(e), abort.signal)
      ends.push(endedVm)

      const ls = await cli('volume', 'ls')
      assert.match(ls.stdout, /^vol-held\s.*\sholder\s+-$/m)
      const rm = await cli('volume', 'rm', 'vol-held')
      assert.equal(rm.code, 1)
      assert.match(rm.stderr, /^error UIG_ERR_VOLUME_IN_USE: volume vol-held is attached to holder/)
      const answer = await raw(daemon, 'DELETE', '/v1/volumes/vol-held')
      assert.equal(answer.status, 409)

      const twice = await cli('run', '-d', '--name', 'second', '-v', 'vol-held:/data', 'vol-app', 'hold')
      assert.equal(twice.code, 1)
      assert.match(twice.stderr, /^error UIG_ERR_VOLUME_IN_USE: .*holder/)
      const readOnly = await cli('run', '-d', '--name', 'second-ro', '-v', 'vol-held:/data:ro', 'vol-app', 'hold')
      assert.equal(readOnly.code, 1, 'not read-only either, while holder writes it')
      assert.match(readOnly.stderr, /UIG_ERR_VOLUME_IN_USE/)
      assert.equal((await daemon.api.call<Vm[]>('GET', '/v1/vms')).filter((vm) => vm.name.startsWith('second')).length, 0, 'no VM was left of the refusals')

      assert.equal((await cli('stop', '-t', '5', id)).code, 0)
      const gone = await cli('volume', 'rm', 'vol-held')
      assert.equal(gone.code, 0, `once its VM stopped: ${gone.stderr}`)
      const deadline = Date.now() + 5000
      while (!events.some((e) => e.type === 'volume.deleted') && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50))
    } finally {
      abort.abort()
      await Promise.all(ends)
    }
    assert.deepEqual(vmEvents.filter((e) => e.type.startsWith('volume.')).map((e) => e.type), ['volume.detached'])
    const mine = events.filter((e) => e.type.startsWith('volume.')).map((e) => ({ ...(JSON.parse(e.data) as VolumeEvent), type: e.type }))
    assert.deepEqual(mine.map((e) => [e.type, e.volume, e.vm]), [
      ['volume.attached', 'vol-held', 'holder'],
      ['volume.detached', 'vol-held', 'holder'],
      ['volume.deleted', 'vol-held', undefined]
    ])
  })

  test('a clone of a template (run --template) cannot take a volume', { timeout: 240_000 }, async () => {
    assert.equal((await cli('volume', 'create', 'vol-tpl', '--size', '64M')).code, 0)
    const template = await cli('template', 'create', 'vol-tpl', 'vol-app', '--ready', 'init')
    assert.equal(template.code, 0, template.stderr)
    const clone = await cli('run', '-d', '-v', 'vol-tpl:/data', '--template', 'vol-tpl')
    assert.equal(clone.code, 1)
    assert.match(clone.stderr, /^error UIG_ERR_VOLUME_TEMPLATE: /)
    assert.deepEqual((await daemon.api.call<Volume>('GET', '/v1/volumes/vol-tpl')).attachments, [])
  })

  test('run -v refuses a source that is neither an absolute path nor a volume name, showing both forms', { timeout: 30_000 }, async () => {
    const bad = await cli('run', '-d', '-v', 'relative/dir:/data', 'vol-app', 'hold')
    assert.equal(bad.code, 2)
    assert.match(bad.stderr, /UIG_ERR_CLI_USAGE: --volume takes \/HOST\/DIR:\/GUEST\/DIR\[:ro\|rw\] .* or VOLUME:\/GUEST\/DIR\[:ro\|rw\]/)
    const unknown = await cli('run', '-d', '-v', 'no-such-volume:/data', 'vol-app', 'hold')
    assert.equal(unknown.code, 1)
    assert.match(unknown.stderr, /^error UIG_ERR_VOLUME_NOT_FOUND: .*no-such-volume/)
  })
})
