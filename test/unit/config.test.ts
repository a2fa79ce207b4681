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
