import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { chmod, lstat, mkdir, mkdtemp, readFile, readlink, rm, stat, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test } from 'node:test'
import { gzipSync } from 'node:zlib'
import tar from 'tar-stream'
import { applyLayers, type LayerFile } from '../../src/oci/layer-apply.js'
import { LayerError, type LayerRefusal } from '../../src/oci/layer-errors.js'

const TAR = 'application/vnd.oci.image.layer.v1.tar'
const GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip'
const ZSTD = 'application/vnd.oci.image.layer.v1.tar+zstd'

type Entry = Partial<tar.Header> & { name: string; content?: string | Buffer }

async function tarBytes (entries: Entry[]): Promise<Buffer> {
  const pack = tar.pack()
  const chunks: Buffer[] = []
  const done = new Promise<void>((resolve, reject) => {
    pack.on('data', (c: unknown) => { chunks.push(c as Buffer) })
    pack.on('end', () => resolve())
    pack.on('error', reject)
  })
  for (const { content, ...header } of entries) {
    await new Promise<void>((resolve, reject) => {
      pack.entry({ mtime: new Date(1_600_000_000_000), ...header }, content ?? '', (err) => { if (err != null) reject(err); else resolve() })
    })
  }
  pack.finalize()
  await done
  return Buffer.concat(chunks)
}

async function scratch (t: { after: (fn: () => Promise<void>) => void }): Promise<{ dir: string; root: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'uig-layer-'))
  t.after(async () => { await rm(dir, { recursive: true, force: true }) })
  return { dir, root: join(dir, 'root') }
}

let layerCount = 0
async function layerFile (dir: string, entries: Entry[], mediaType = TAR): Promise<LayerFile> {
  const bytes = await tarBytes(entries)
  const path = join(dir, `layer-${++layerCount}`)
  if (mediaType === GZIP) await writeFile(path, gzipSync(bytes))
  else if (mediaType === ZSTD) execFileSync('zstd', ['-q', '-o', path], { input: bytes })
  else await writeFile(path, bytes)
  return { path, mediaType }
}

async function refused (promise: Promise<unknown>, reason: LayerRefusal, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof LayerError, `a LayerError, got ${String(err)}`)
    assert.equal(err.reason, reason)
    assert.equal(err.code, { unsafe: 'UIG_ERR_OCI_LAYER_UNSAFE', invalid: 'UIG_ERR_OCI_LAYER_INVALID', 'too-large': 'UIG_ERR_OCI_LAYER_TOO_LARGE' }[reason])
    assert.match(err.message, pattern)
    return true
  })
}

test('a whiteout deletes a lower file or directory, an opaque directory hides every lower entry in it but keeps its own layer\'s', async (t) => {
  const { dir, root } = await scratch(t)
  const lower = await layerFile(dir, [
    { name: 'a/', type: 'directory' },
    { name: 'a/x', content: 'x' },
    { name: 'a/y', content: 'y' },
    { name: 'b/keep', content: 'k' },
    { name: 'c/old', content: 'old' },
    { name: 'c/sub/deep', content: 'deep' },
    { name: 'd/inside', content: 'i' }
  ])
  const upper = await layerFile(dir, [
    { name: 'a/.wh.x' },
    { name: 'c/new', content: 'new' },
    { name: 'c/sub/', type: 'directory' },
    { name: 'c/.wh..wh..opq' },
    { name: '.wh.d' },
    { name: 'e/.wh.never-there' }
  ], GZIP)
  const result = await applyLayers([lower, upper], root)
  assert.equal(existsSync(join(root, 'a/x')), false)
  assert.equal(await readFile(join(root, 'a/y'), 'utf8'), 'y')
  assert.equal(await readFile(join(root, 'b/keep'), 'utf8'), 'k')
  assert.equal(existsSync(join(root, 'c/old')), false, 'the opaque dir hides the lower file')
  assert.equal(existsSync(join(root, 'c/sub/deep')), false, 'and what the lower layer had below a dir this layer also has')
  assert.ok((await stat(join(root, 'c/sub'))).isDirectory())
  assert.equal(await readFile(join(root, 'c/new'), 'utf8'), 'new', 'written before the marker in the same layer: kept')
  assert.equal(existsSync(join(root, 'd')), false)
  assert.equal(existsSync(join(root, '.wh.d')), false, 'whiteout files themselves are never written')
  assert.equal(result.whiteouts, 4)
  assert.equal(result.files, 7)
})

test('a whiteout does not hide a file of its own layer', async (t) => {
  const { dir, root } = await scratch(t)
  const layer = await layerFile(dir, [{ name: 'f', content: 'mine' }, { name: '.wh.f' }])
  await applyLayers([layer], root)
  assert.equal(await readFile(join(root, 'f'), 'utf8'), 'mine')
})

test('hard links share the inode, symlinks keep their target, modes (setuid, sticky), owners and mtimes are kept; devices and fifos are skipped', async (t) => {
  const { dir, root } = await scratch(t)
  const mtime = new Date(1_500_000_000_000)
  const layer = await layerFile(dir, [
    { name: './', type: 'directory', mode: 0o755 },
    { name: 'bin/', type: 'directory', mode: 0o755, mtime },
    { name: 'bin/busybox', content: 'ELF', mode: 0o755 },
    { name: 'bin/sh', type: 'link', linkname: 'bin/busybox' },
    { name: 'usr/bin/env', type: 'symlink', linkname: '/bin/busybox' },
    { name: 'usr/bin/su', content: 'su', mode: 0o4755, uid: 0, gid: 0 },
    { name: 'usr/bin/wall', content: 'wall', mode: 0o2755, uid: 0, gid: 5 },
    { name: 'home/u/notes', content: 'n', mode: 0o640, uid: 1000, gid: 1001, mtime },
    { name: 'tmp/', type: 'directory', mode: 0o1777 },
    { name: 'dev/null', type: 'character-device', devmajor: 1, devminor: 3, mode: 0o666 },
    { name: 'dev/sda', type: 'block-device', devmajor: 8, devminor: 0 },
    { name: 'run/initctl', type: 'fifo' }
  ], ZSTD)
  const result = await applyLayers([layer], root)
  const busybox = await lstat(join(root, 'bin/busybox'))
  assert.equal((await lstat(join(root, 'bin/sh'))).ino, busybox.ino)
  assert.equal(busybox.nlink, 2)
  assert.equal(await readlink(join(root, 'usr/bin/env')), '/bin/busybox')
  assert.equal((await lstat(join(root, 'usr/bin/su'))).mode & 0o7777, 0o4755)
  const wall = await lstat(join(root, 'usr/bin/wall'))
  assert.equal(wall.mode & 0o7777, 0o2755)
  assert.equal(wall.gid, 5)
  const notes = await lstat(join(root, 'home/u/notes'))
  assert.deepEqual([notes.uid, notes.gid, notes.mode & 0o7777], [1000, 1001, 0o640])
  assert.equal(notes.mtimeMs, mtime.getTime())
  assert.equal((await lstat(join(root, 'bin'))).mtimeMs, mtime.getTime(), 'a dir keeps its mtime although its files were written after it')
  assert.equal((await lstat(join(root, 'tmp'))).mode & 0o7777, 0o1777)
  assert.equal(existsSync(join(root, 'dev/null')), false)
  assert.equal(existsSync(join(root, 'run/initctl')), false)
  assert.deepEqual(result.skipped, { devices: 2, fifos: 1, xattrs: 0 })
  assert.deepEqual([result.files, result.hardlinks, result.symlinks], [4, 1, 1])
  assert.equal(result.bytes, 'ELF'.length + 'su'.length + 'wall'.length + 1)
})

test('security.capability from a GNU tar layer is set again, binary bytes intact', async (t) => {
  const { dir, root } = await scratch(t)
  const src = join(dir, 'src')
  await mkdir(join(src, 'bin'), { recursive: true })
  await writeFile(join(src, 'bin/ping'), 'ping')
  await chmod(join(src, 'bin/ping'), 0o755)
  // cap_setuid is bit 7: a 0x80 byte, which a UTF-8 decoding of the PAX value would destroy.
  execFileSync('setcap', ['cap_net_raw,cap_setuid+ep', join(src, 'bin/ping')])
  const path = join(dir, 'caps.tar')
  execFileSync('tar', ['--xattrs', '--xattrs-include=security.capability', '-C', src, '-cf', path, 'bin'])
  const result = await applyLayers([{ path, mediaType: TAR }], root)
  assert.equal(result.capabilities, 1)
  const caps = execFileSync('getcap', [join(root, 'bin/ping')], { encoding: 'utf8' })
  assert.match(caps, /cap_setuid,cap_net_raw[=+]ep/)
})

test('hostile layers are refused, each with its reason, and nothing is written outside the root', async (t) => {
  const { dir, root } = await scratch(t)
  const outside = join(dir, 'outside')
  await mkdir(outside)
  await writeFile(join(outside, 'secret'), 'secret')
  const cases: Array<{ what: string; layers: Entry[][]; reason: LayerRefusal; pattern: RegExp; limits?: Parameters<typeof applyLayers>[2] }> = [
    { what: '../ entry', layers: [[{ name: '../outside/evil', content: 'x' }]], reason: 'unsafe', pattern: /"\.\." component/ },
    { what: 'nested ../', layers: [[{ name: 'a/../../evil', content: 'x' }]], reason: 'unsafe', pattern: /"\.\." component/ },
    { what: 'absolute path', layers: [[{ name: '/etc/evil', content: 'x' }]], reason: 'unsafe', pattern: /absolute path/ },
    {
      what: 'symlink escape written through, by a later layer',
      layers: [[{ name: 'link', type: 'symlink', linkname: outside }], [{ name: 'link/evil', content: 'x' }]],
      reason: 'unsafe',
      pattern: /written through the symlink "link"/
    },
    {
      what: 'relative symlink escape written through, same layer',
      layers: [[{ name: 'link', type: 'symlink', linkname: '../outside' }, { name: 'link/evil', content: 'x' }]],
      reason: 'unsafe',
      pattern: /written through the symlink/
    },
    {
      what: 'directory entry through a symlink',
      layers: [[{ name: 'link', type: 'symlink', linkname: outside }, { name: 'link/sub/', type: 'directory' }]],
      reason: 'unsafe',
      pattern: /written through the symlink/
    },
    {
      what: 'whiteout through a symlink (would delete outside)',
      layers: [[{ name: 'link', type: 'symlink', linkname: outside }], [{ name: 'link/.wh.secret' }]],
      reason: 'unsafe',
      pattern: /through the symlink "link"/
    },
    { what: 'hard link to outside', layers: [[{ name: 'hl', type: 'link', linkname: '../outside/secret' }]], reason: 'unsafe', pattern: /hard link whose target has a "\.\." component/ },
    { what: 'hard link to an absolute path', layers: [[{ name: 'hl', type: 'link', linkname: join(outside, 'secret') }]], reason: 'unsafe', pattern: /absolute path/ },
    {
      what: 'hard link through a symlink',
      layers: [[{ name: 'link', type: 'symlink', linkname: outside }, { name: 'hl', type: 'link', linkname: 'link/secret' }]],
      reason: 'unsafe',
      pattern: /reached through the symlink "link"/
    },
    { what: 'hard link to a missing target', layers: [[{ name: 'hl', type: 'link', linkname: 'nope' }]], reason: 'invalid', pattern: /not in the tree/ },
    { what: 'oversized entry', layers: [[{ name: 'big', content: Buffer.alloc(100) }]], reason: 'too-large', pattern: /100 bytes, past the limit of 10/, limits: { maxEntryBytes: 10 } },
    { what: 'total past the limit', layers: [[{ name: 'a', content: Buffer.alloc(60) }], [{ name: 'b', content: Buffer.alloc(60) }]], reason: 'too-large', pattern: /more than 100 bytes/, limits: { maxTotalBytes: 100 } },
    { what: 'too many entries', layers: [[{ name: 'a' }, { name: 'b' }, { name: 'c' }]], reason: 'too-large', pattern: /more than 2 entries/, limits: { maxEntries: 2 } }
  ]
  for (const c of cases) {
    await t.test(c.what, async () => {
      await rm(root, { recursive: true, force: true })
      const layers = []
      for (const entries of c.layers) layers.push(await layerFile(dir, entries))
      await refused(applyLayers(layers, root, c.limits), c.reason, c.pattern)
      assert.deepEqual(execFileSync('ls', ['-A', outside], { encoding: 'utf8' }).trim().split('\n'), ['secret'])
      assert.equal(await readFile(join(outside, 'secret'), 'utf8'), 'secret')
      assert.equal(existsSync(join(dir, 'evil')), false)
    })
  }
})

test('truncated, garbage and mislabelled layers are refused as invalid', async (t) => {
  const { dir, root } = await scratch(t)
  const good = await tarBytes([{ name: 'f', content: Buffer.alloc(5000, 1) }, { name: 'g', content: 'g' }])
  const write = async (name: string, bytes: Buffer): Promise<string> => { const p = join(dir, name); await writeFile(p, bytes); return p }
  const cases: Array<{ what: string; layer: LayerFile; pattern: RegExp }> = [
    { what: 'cut in a file', layer: { path: await write('cut.tar', good.subarray(0, 2000)), mediaType: TAR }, pattern: /ends inside entry "f"/ },
    { what: 'cut in a header', layer: { path: await write('cut2.tar', good.subarray(0, 5632 + 100)), mediaType: TAR }, pattern: /Unexpected end of data/ },
    { what: 'garbage', layer: { path: await write('garbage.tar', Buffer.from('not a tar at all\n'.repeat(100))), mediaType: TAR }, pattern: /Invalid tar header/ },
    { what: 'not gzip', layer: { path: await write('plain.tar.gz', good), mediaType: GZIP }, pattern: /incorrect header check/ },
    { what: 'gzip cut short', layer: { path: await write('cut.tar.gz', gzipSync(good).subarray(0, 100)), mediaType: GZIP }, pattern: /unexpected end of file|Unexpected end of data/ },
    { what: 'zstd cut short', layer: { path: await write('cut.tar.zst', execFileSync('zstd', ['-q', '-c'], { input: good }).subarray(0, 20)), mediaType: ZSTD }, pattern: /zstd could not decompress|Unexpected end of data/ },
    { what: 'unknown media type', layer: { path: await write('x.tar', good), mediaType: 'application/vnd.example.layer+lz4' }, pattern: /media type "application\/vnd.example.layer\+lz4" is not a layer type/ }
  ]
  for (const c of cases) {
    await t.test(c.what, async () => {
      await rm(root, { recursive: true, force: true })
      await refused(applyLayers([c.layer], root), 'invalid', c.pattern)
    })
  }
})

test('a lower file replaced by a directory, a directory by a symlink, and a file rewritten that had a hard link', async (t) => {
  const { dir, root } = await scratch(t)
  const lower = await layerFile(dir, [
    { name: 'p', content: 'file' },
    { name: 'q/inner', content: 'i' },
    { name: 'r', content: 'orig' },
    { name: 'r2', type: 'link', linkname: 'r' }
  ])
  const upper = await layerFile(dir, [
    { name: 'p/child', content: 'c' },
    { name: 'q', type: 'symlink', linkname: '/elsewhere' },
    { name: 'r', content: 'new' }
  ])
  await applyLayers([lower, upper], root)
  assert.equal(await readFile(join(root, 'p/child'), 'utf8'), 'c')
  assert.equal(await readlink(join(root, 'q')), '/elsewhere')
  assert.equal(await readFile(join(root, 'r'), 'utf8'), 'new')
  assert.equal(await readFile(join(root, 'r2'), 'utf8'), 'orig', 'rewriting a name unlinks it, it does not write into the shared inode')
})
