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

test('a cluster node takes its etcd endpoints, name, address, labels and capacity from its variables, and bad ones are refused', () => {
  const single = { UIGNITER_DATA_DIR: '/tmp/x' }
  assert.deepEqual(loadConfig(single).cluster.etcd, [], 'no etcd: a single host')
  const c = loadConfig({ ...single, UIGNITER_ETCD: 'http://10.0.0.1:2379, http://10.0.0.2:2379', UIGNITER_NODE: 'node-a', UIGNITER_NODE_ADDRESS: '10.0.0.1', UIGNITER_NODE_LABELS: 'zone=a,disk=ssd', UIGNITER_NODE_VCPUS: '16', UIGNITER_NODE_MEMORY_MIB: '4096' }).cluster
  assert.deepEqual(c.etcd, ['http://10.0.0.1:2379', 'http://10.0.0.2:2379'])
  assert.deepEqual([c.node, c.address, c.labels, c.capacity], ['node-a', '10.0.0.1', { zone: 'a', disk: 'ssd' }, { vcpus: 16, memoryMiB: 4096 }])
  assert.equal(c.leaseTtlS, 5)
  const refused: Array<[Record<string, string>, RegExp]> = [
    [{ UIGNITER_NODE: 'Node_A' }, /cluster\/node/],
    [{ UIGNITER_ETCD: 'etcd:2379' }, /cluster\/etcd/],
    [{ UIGNITER_NODE_LABELS: 'zone' }, /"zone" is not key=value/],
    [{ UIGNITER_NODE_LABELS: 'zone=a b' }, /cluster\/labels/],
    [{ UIGNITER_NODE_VCPUS: 'many' }, /cluster\/capacity\/vcpus/]
  ]
  for (const [bad, field] of refused) {
    assert.throws(() => loadConfig({ ...single, ...bad }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'UIG_ERR_CONFIG_INVALID')
      assert.match(err.message, field)
      return true
    })
  }
})

test('plain-HTTP registries and a credentials file come from the config or their variables; a URL or a path is refused as a registry', () => {
  const env = { UIGNITER_DATA_DIR: '/tmp/x' }
  assert.deepEqual(loadConfig(env).registries, { insecure: [] }, 'none by default: every registry is https')
  const r = loadConfig({ ...env, UIGNITER_INSECURE_REGISTRIES: 'localhost:5000, 127.0.0.1:5001,[::1]:5002,registry.lab', UIGNITER_REGISTRY_CREDENTIALS: '/root/.docker/config.json' }).registries
  assert.deepEqual(r, { insecure: ['localhost:5000', '127.0.0.1:5001', '[::1]:5002', 'registry.lab'], credentials: '/root/.docker/config.json' })
  for (const bad of ['http://localhost:5000', 'localhost:5000/team', 'local host', 'localhost:']) {
    assert.throws(() => loadConfig({ ...env, UIGNITER_INSECURE_REGISTRIES: bad }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'UIG_ERR_CONFIG_INVALID')
      assert.match(err.message, /registries\/insecure\/0/)
      return true
    })
  }
})
