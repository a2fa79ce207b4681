import assert from 'node:assert/strict'
import { existsSync } from 'node:fs'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test } from 'node:test'
import { run } from '../../src/core/exec.js'
import { applySourceEdits, SOURCE_EDITS, sourceEditsFingerprint } from '../../src/guest/kernel/source-edits.js'

const TARBALL = '/usr/src/linux-source-6.1.tar.xz'

test('a source edit replaces its text once, and refuses a file that holds it nowhere or twice', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'uigniter-edits-'))
  t.after(() => rm(dir, { recursive: true, force: true }))
  await writeFile(join(dir, 'a.c'), 'int x = 1;\n')
  await applySourceEdits(dir, [{ file: 'a.c', find: 'x = 1', replace: 'x = 2' }])
  assert.equal(await readFile(join(dir, 'a.c'), 'utf8'), 'int x = 2;\n')
  await assert.rejects(applySourceEdits(dir, [{ file: 'a.c', find: 'x = 1', replace: 'x = 3' }]), (err: Error & { code?: string }) =>
    err.code === 'UIG_ERR_KERNEL_BUILD_FAILED' && err.message.includes('a.c') && err.message.includes('nowhere'))
  await writeFile(join(dir, 'b.c'), 'y; y;\n')
  await assert.rejects(applySourceEdits(dir, [{ file: 'b.c', find: 'y;', replace: 'z;' }]), /more than once/)
  assert.notEqual(sourceEditsFingerprint(), sourceEditsFingerprint([]), 'the edits are part of the kernel cache key')
})

// Before a 15-minute build finds out: every edit still matches the installed linux-source.
test('every edit matches Debian\'s linux-source-6.1 exactly once', { skip: !existsSync(TARBALL) && `${TARBALL} is not installed`, timeout: 120_000 }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'uigniter-edits-'))
  t.after(() => rm(dir, { recursive: true, force: true }))
  const files = [...new Set(SOURCE_EDITS.map((e) => e.file))]
  await run('tar', ['-xf', TARBALL, '-C', dir, '--strip-components=1', ...files.map((f) => `linux-source-6.1/${f}`)])
  await applySourceEdits(dir)
  for (const edit of SOURCE_EDITS) assert.ok((await readFile(join(dir, edit.file), 'utf8')).includes(edit.replace), edit.file)
})
