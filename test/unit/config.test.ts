import assert from 'node:assert/strict'
import { test } from 'node:test'
import { loadConfig } from '../../src/core/config.js'


test('the clone identity deadline comes from its variable, and a bad one is refused with the field named', () => {
  const env = { UIGNITER_DATA_DIR: '/tmp/x' }
  assert.equal(loadConfig(env).clones.identityTimeoutMs, 5000)
  assert.equal(loadConfig({ ...env, UIGNITER_CLONE_IDENTITY_TIMEOUT_MS: '250' }).clones.identityTimeoutMs, 250)
  for (const bad of ['soon', '0', '-5']) {
    assert.throws(() => loadConfig({ ...env, UIGNITER_CLONE_IDENTITY_TIMEOUT_MS: bad }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'UIG_ERR_CONFIG_INVALID')
      assert.match(err.message, /clones\/identityTimeoutMs/)
      return true
    })
  }
})

test('the gateway listens where its variables say, and a bad port is refused with the field named', () => {
  const env = { UIGNITER_DATA_DIR: '/tmp/x' }
  assert.deepEqual(loadConfig(env).gateway, { address: '0.0.0.0', httpPort: 7380 })
  assert.deepEqual(loadConfig({ ...env, UIGNITER_GATEWAY_ADDRESS: '127.0.0.1', UIGNITER_GATEWAY_HTTP_PORT: '8081' }).gateway, { address: '127.0.0.1', httpPort: 8081 })
  for (const bad of ['http', '0', '70000']) {
    assert.throws(() => loadConfig({ ...env, UIGNITER_GATEWAY_HTTP_PORT: bad }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'UIG_ERR_CONFIG_INVALID')
      assert.match(err.message, /gateway\/httpPort/)
      return true
    })
  }
})
