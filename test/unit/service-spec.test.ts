import assert from 'node:assert/strict'
import { describe, test } from 'node:test'
import { UigniterError } from '../../src/core/errors.js'
import { changesReplicas, parseAppFile, parseAppText, parseServiceSpec } from '../../src/service/service-spec.js'

const minimal = { name: 'web', image: 'hello', ports: [{ port: 8080 }] }

function rejects (input: unknown, code: string, pattern: RegExp, parse: (i: unknown) => unknown = parseServiceSpec): void {
  assert.throws(() => parse(input), (err: unknown) => {
    assert.ok(err instanceof UigniterError, `a UigniterError, not ${String(err)}`)
    assert.equal(err.code, code)
    assert.match(err.message, pattern)
    return true
  })
}

describe('service specs', () => {
  test('a minimal spec gets the documented defaults', () => {
    const spec = parseServiceSpec(minimal)
    assert.deepEqual(spec.replicas, { min: 1, max: 1 })
    assert.equal(spec.ports[0]?.protocol, 'http')
    assert.equal(spec.startPath, 'clone')
    assert.equal(spec.restart, 'always')
    assert.deepEqual(spec.loadBalancing, { strategy: 'round-robin', replicaWeight: 1 })
    assert.deepEqual(spec.hold, { maxRequests: 100, timeoutMs: 30_000 })
    assert.equal(parseServiceSpec({ ...minimal, replicas: { min: 0 } }).replicas.max, 1, 'min 0 may wake to one replica')
    assert.equal(parseServiceSpec({ ...minimal, replicas: { min: 3 } }).replicas.max, 3)
  })

  test('bad specs are rejected with the field and what to do', () => {
    const bad: Array<[unknown, RegExp]> = [
      [{ ...minimal, name: 'Web_1' }, /\/name/],
      [{ ...minimal, replicas: { min: -1 } }, /replicas\/min/],
      [{ ...minimal, replicas: { min: 3, max: 2 } }, /replicas\.max \(2\) is below replicas\.min \(3\)/],
      [{ ...minimal, ports: [] }, /\/ports/],
      [{ ...minimal, ports: [{ port: 11211, protocol: 'tcp' }] }, /ports\[0\]: a tcp port needs a gatewayPort/],
      [{ ...minimal, ports: [{ port: 80, gatewayPort: 8000 }] }, /gatewayPort is for tcp ports/],
      [{ ...minimal, ports: [{ port: 80 }, { port: 81 }] }, /at most one http port/],
      [{ ...minimal, ports: [{ port: 80 }, { port: 80, protocol: 'tcp', gatewayPort: 9 }] }, /port 80 is listed twice/],
      [{ ...minimal, healthCheck: { port: 9999 } }, /healthCheck\.port: 9999 is not one of the service's ports/],
      [{ ...minimal, healthCheck: { intervalMs: 5 } }, /healthCheck\/intervalMs/],
      [{ ...minimal, loadBalancing: { strategy: 'fastest' } }, /loadBalancing\/strategy/],
      [{ ...minimal, loadBalancing: { strategy: 'consistent-hash' } }, /consistent-hash needs hashOn/],
      [{ ...minimal, loadBalancing: { strategy: 'random', hashOn: 'path' } }, /only the consistent-hash strategy hashes/],
      [{ ...minimal, loadBalancing: { strategy: 'consistent-hash', hashOn: 'query' } }, /hashOn/],
      [{ ...minimal, startPath: 'warm' }, /startPath/],
      [{ ...minimal, restart: 'sometimes' }, /restart/],
      [{ ...minimal, env: { 'BAD-NAME': 'x' } }, /env/],
      [{ ...minimal, replica: 2 }, /replica/],
      [{ name: 'ext', ports: [{ port: 80 }] }, /neither an image \(for replicas\) nor endpoints/],
      [{ name: 'ext', ports: [{ port: 80 }], replicas: { min: 1 }, endpoints: [{ host: '10.0.0.1' }] }, /no image, so it cannot have replicas/],
      [{ ...minimal, replicas: { min: 0, max: 0 } }, /replicas\.max must be at least 1 for a service with an image/],
      [{ name: 'ext', ports: [{ port: 80 }], replicas: { min: 0 }, endpoints: [{ host: '10.0.0.1' }, { host: '10.0.0.1' }] }, /10\.0\.0\.1 is listed twice/],
      [{ ...minimal, endpoints: [{ host: 'example.com' }] }, /endpoints\/0\/host/],
      [{ ...minimal, autoscale: { targetInFlight: 0 } }, /targetInFlight/]
    ]
    for (const [input, pattern] of bad) rejects(input, 'UIG_ERR_SERVICE_SPEC_INVALID', pattern)
  })

  test('an external-only service has no replicas and routes to its endpoints', () => {
    const spec = parseServiceSpec({ name: 'legacy', ports: [{ port: 80 }], replicas: { min: 0 }, endpoints: [{ host: '192.168.1.5', weight: 3 }] })
    assert.deepEqual(spec.replicas, { min: 0, max: 0 })
    assert.deepEqual(spec.endpoints, [{ host: '192.168.1.5', weight: 3, priority: 1 }])
  })

  test('an external-only service needs no replicas field, and a checked spec passes the check again (uigniter up checks, then the API)', () => {
    const spec = parseServiceSpec({ name: 'legacy', ports: [{ port: 80 }], endpoints: [{ host: '192.168.1.5' }] })
    assert.deepEqual(spec.replicas, { min: 0, max: 0 })
    assert.deepEqual(parseServiceSpec(JSON.parse(JSON.stringify(spec))), spec)
    const file = parseAppFile({ app: 'legacy', services: [{ name: 'legacy', ports: [{ port: 80 }], endpoints: [{ host: '192.168.1.5' }] }] })
    assert.deepEqual(parseAppFile(JSON.parse(JSON.stringify(file))), file)
  })

  test('volumes: per-replica ones make the service cold by default, shared ones are read-only, and clones are refused', () => {
    const data = { name: 'data', guestPath: '/data', perReplica: true, sizeMiB: 256 }
    const spec = parseServiceSpec({ ...minimal, volumes: [data, { name: 'assets', guestPath: '/srv/assets' }] })
    assert.equal(spec.startPath, 'cold', 'a service with volumes boots its replicas')
    assert.deepEqual(parseServiceSpec(spec), spec, 'a checked spec passes the check again')
    rejects({ ...minimal, startPath: 'clone', volumes: [data] }, 'UIG_ERR_VOLUME_TEMPLATE', /cannot be cloned from a template.*startPath: cold/)
    rejects({ ...minimal, startPath: 'pool', volumes: [data] }, 'UIG_ERR_VOLUME_TEMPLATE', /clone pool/)
    rejects({ ...minimal, volumes: [{ ...data, sizeMiB: undefined }] }, 'UIG_ERR_SERVICE_SPEC_INVALID', /volumes\[0\]\.sizeMiB: a per-replica volume needs the size/)
    rejects({ ...minimal, volumes: [{ name: 'assets', guestPath: '/a', readOnly: false }] }, 'UIG_ERR_SERVICE_SPEC_INVALID', /must be read-only/)
    rejects({ ...minimal, volumes: [{ name: 'assets', guestPath: '/a', sizeMiB: 64 }] }, 'UIG_ERR_SERVICE_SPEC_INVALID', /exists already/)
    rejects({ ...minimal, volumes: [data, { ...data, name: 'other' }] }, 'UIG_ERR_SERVICE_SPEC_INVALID', /\/data is used by two volumes/)
    rejects({ ...minimal, volumes: [data, { ...data, guestPath: '/x' }] }, 'UIG_ERR_SERVICE_SPEC_INVALID', /listed twice/)
    rejects({ ...minimal, volumes: [{ ...data, guestPath: '/data/../etc' }] }, 'UIG_ERR_SERVICE_SPEC_INVALID', /normalized absolute path/)
    rejects({ ...minimal, volumes: [{ ...data, name: 'Bad_Name' }] }, 'UIG_ERR_SERVICE_SPEC_INVALID', /volumes/)
    assert.ok(changesReplicas(spec, { ...spec, volumes: [data] }), 'a change of volumes is a rollout')
  })

  test('only a change of what a replica runs makes a new generation', () => {
    const base = parseServiceSpec({ ...minimal, env: { A: '1', B: '2' } })
    assert.equal(changesReplicas(base, parseServiceSpec({ ...minimal, env: { B: '2', A: '1' } })), false, 'env order does not matter')
    assert.equal(changesReplicas(base, parseServiceSpec({ ...minimal, env: { A: '1', B: '2' }, replicas: { min: 3 }, loadBalancing: { strategy: 'random' } })), false)
    assert.equal(changesReplicas(base, parseServiceSpec({ ...minimal, env: { A: '1', B: '3' } })), true)
    assert.equal(changesReplicas(base, parseServiceSpec({ ...minimal, image: 'hello:v2', env: { A: '1', B: '2' } })), true)
    assert.equal(changesReplicas(base, parseServiceSpec({ ...minimal, env: { A: '1', B: '2' }, resources: { memoryMiB: 128 } })), true)
  })
})

describe('application files', () => {
  const yaml = `app: shop
services:
  - name: api
    image: hello
    ports: [{ port: 8080 }]
  - name: kv
    image: memcached
    ports:
      - { port: 11211, protocol: tcp, gatewayPort: 11311 }
`

  test('YAML and JSON are read alike', () => {
    const fromYaml = parseAppText(yaml, 'uigniter.yaml')
    assert.equal(fromYaml.app, 'shop')
    assert.deepEqual(fromYaml.services.map((s) => s.name), ['api', 'kv'])
    assert.deepEqual(parseAppText(JSON.stringify(fromYaml), 'app.json'), fromYaml)
  })

  test('syntax errors name the file, line and column', () => {
    rejects('app: shop\nservices:\n  - name: api\n   image: hello\n', 'UIG_ERR_SERVICE_SPEC_INVALID', /^f\.yaml:4:\d+: /, (t) => parseAppText(t as string, 'f.yaml'))
    rejects('app: shop\napp: again\nservices: []\n', 'UIG_ERR_SERVICE_SPEC_INVALID', /^f\.yaml:2:\d+: .*unique/i, (t) => parseAppText(t as string, 'f.yaml'))
  })

  test('errors inside a service name its place in the file', () => {
    rejects(yaml.replace('port: 8080', 'port: 0'), 'UIG_ERR_SERVICE_SPEC_INVALID', /^f\.yaml: invalid service \(services\[0\]\): \/ports\/0\/port/, (t) => parseAppText(t as string, 'f.yaml'))
  })

  test('what spans services is checked: names, gateway ports, the shape', () => {
    const api = { name: 'api', image: 'hello', ports: [{ port: 8080 }] }
    const kv = (name: string, gatewayPort: number): unknown => ({ name, image: 'memcached', ports: [{ port: 11211, protocol: 'tcp', gatewayPort }] })
    rejects({ app: 'a', services: [api, api] }, 'UIG_ERR_SERVICE_SPEC_INVALID', /service "api" is declared twice/, (i) => parseAppFile(i))
    rejects({ app: 'a', services: [kv('one', 11311), kv('two', 11311)] }, 'UIG_ERR_SERVICE_CONFLICT', /"one" and "two" both ask for gatewayPort 11311/, (i) => parseAppFile(i))
    rejects({ app: 'a', services: [kv('one', 7380)] }, 'UIG_ERR_SERVICE_CONFLICT', /gatewayPort 7380 is the gateway's HTTP port/, (i) => parseAppFile(i, 7380))
    rejects({ app: 'a', services: [] }, 'UIG_ERR_SERVICE_SPEC_INVALID', /services: a list of 1 to 100/, (i) => parseAppFile(i))
    rejects({ app: 'A B', services: [api] }, 'UIG_ERR_SERVICE_SPEC_INVALID', /app: the application's name/, (i) => parseAppFile(i))
    rejects({ app: 'a', services: [api], version: 3 }, 'UIG_ERR_SERVICE_SPEC_INVALID', /unknown field "version"/, (i) => parseAppFile(i))
    rejects(['app'], 'UIG_ERR_SERVICE_SPEC_INVALID', /holds an object/, (i) => parseAppFile(i))
  })
})
