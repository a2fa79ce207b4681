import assert from 'node:assert/strict'
import { mkdtemp, realpath, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { TestContext } from 'node:test'
import { UigniterError, type ErrorCode } from '../../src/core/errors.js'

/** A temp dir removed after the test, by its realpath ($ORIGIN of an executable is symlink-free). */
export async function tempDir (t: TestContext, prefix = 'uigniter-'): Promise<string> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), prefix)))
  t.after(async () => { await rm(dir, { recursive: true, force: true }) })
  return dir
}

/** Asserts that `promise` rejects with a UigniterError of `code` whose message mentions every fragment. */
export async function rejectsWith (promise: Promise<unknown>, code: ErrorCode, ...fragments: string[]): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof UigniterError, `expected a UigniterError, got ${String(err)}`)
    assert.equal(err.code, code, err.message)
    for (const fragment of fragments) assert.ok(err.message.includes(fragment), `"${err.message}" should mention "${fragment}"`)
    return true
  })
}
