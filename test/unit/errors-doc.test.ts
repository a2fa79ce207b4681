import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { test } from 'node:test'
import { errorCodes } from '../../src/core/errors.js'
import { packageRoot } from '../../src/core/package-paths.js'

test('every error code is documented in docs/errors.md with its HTTP status', async () => {
  const doc = await readFile(join(packageRoot, 'docs/errors.md'), 'utf8')
  for (const [code, { statusCode }] of Object.entries(errorCodes)) {
    const row = doc.split('\n').find((line) => line.includes(`\`${code}\``))
    assert.ok(row !== undefined, `${code} is missing from docs/errors.md`)
    assert.match(row, new RegExp(`\\|\\s*${statusCode}\\s*\\|`), `${code}'s row should give status ${statusCode}`)
  }
})
