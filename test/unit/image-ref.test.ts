import assert from 'node:assert/strict'
import { test } from 'node:test'
import { UigniterError } from '../../src/core/errors.js'
import { parseImageRef } from '../../src/core/image.js'

test('image refs: a name defaults to the latest tag; names may have path components', () => {
  assert.deepEqual(parseImageRef('hello'), { name: 'hello', tag: 'latest' })
  assert.deepEqual(parseImageRef('examples/node-http:v1.2'), { name: 'examples/node-http', tag: 'v1.2' })
  assert.deepEqual(parseImageRef('a.b_c-d:_x'), { name: 'a.b_c-d', tag: '_x' })
})

test('image refs: invalid names and tags are UIG_ERR_IMAGE_INVALID_NAME', () => {
  for (const bad of ['', 'Hello', 'hello:', 'hello:-x', 'hel lo', '-hello', 'hello//x', 'a'.repeat(129), 'hello:' + 'x'.repeat(129), 'héllo', '../x']) {
    assert.throws(() => parseImageRef(bad), (err: unknown) => err instanceof UigniterError && err.code === 'UIG_ERR_IMAGE_INVALID_NAME', bad)
  }
})
