import assert from 'node:assert/strict'
import { chown, copyFile, mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test } from 'node:test'
import { run } from '../../src/core/exec.js'
import { createTestContext } from '../helpers/fixtures.js'

/**
 * A root that keeps its owners (as a pulled image's does) reaches its disk
 * with them, setuid bits and file capabilities included: read back from the
 * squashfs with Debian's unsquashfs and getcap. No VM.
 */
test('a root that keeps its owners keeps them on its disk, with setuid bits and file capabilities', { timeout: 120_000 }, async (t) => {
  const ctx = await createTestContext()
  const work = await mkdtemp(join(tmpdir(), 'uigniter-owners-'))
  t.after(async () => { await rm(work, { recursive: true, force: true }); await ctx.cleanup() })
  const root = join(work, 'root')
  await mkdir(join(root, 'bin'), { recursive: true })
  await mkdir(join(root, 'home/app'), { recursive: true })
  await copyFile('/bin/busybox', join(root, 'bin/busybox'))
  await copyFile('/bin/busybox', join(root, 'bin/pinger'))
  await run('chmod', ['755', join(root, 'bin/busybox')])
  await run('chmod', ['4755', join(root, 'bin/pinger')])
  await run('setcap', ['cap_net_raw+ep', join(root, 'bin/pinger')])
  await writeFile(join(root, 'home/app/notes'), 'mine\n')
  await chown(join(root, 'home/app'), 1000, 1000)
  await chown(join(root, 'home/app/notes'), 1000, 1000)

  const manifest = await ctx.builder.build({ name: 'owners', source: { kind: 'rootfs', dir: root, entrypoint: '/bin/busybox', args: ['true'], owners: 'keep' } }, work)
  assert.equal(manifest.format, 'squashfs')
  const out = join(work, 'unpacked')
  await run('unsquashfs', ['-q', '-d', out, ctx.store.blobPath(manifest.rootfs?.digest ?? '')])
  const notes = await stat(join(out, 'home/app/notes'))
  assert.deepEqual([notes.uid, notes.gid], [1000, 1000])
  const pinger = await stat(join(out, 'bin/pinger'))
  assert.equal(pinger.mode & 0o7777, 0o4755, 'setuid kept')
  assert.match((await run('getcap', [join(out, 'bin/pinger')])).stdout, /cap_net_raw[=+]ep/)
  assert.equal((await stat(join(out, 'bin/busybox'))).uid, 0)

  // Without owners: keep (every other source), the disk is root's, as before.
  const plain = await ctx.builder.build({ name: 'plain', format: 'squashfs', source: { kind: 'rootfs', dir: root, entrypoint: '/bin/busybox', args: ['true'] } }, work)
  const plainOut = join(work, 'plain')
  await run('unsquashfs', ['-q', '-d', plainOut, ctx.store.blobPath(plain.rootfs?.digest ?? '')])
  assert.equal((await stat(join(plainOut, 'home/app/notes'))).uid, 0)
})
