import assert from 'node:assert/strict'
import { test } from 'node:test'
import { OciError } from '../../src/oci/oci-errors.js'
import { formatReference, parseReference } from '../../src/oci/reference.js'
import { CredentialsFile, parseChallenges } from '../../src/oci/registry-auth.js'
import { layerCompression } from '../../src/oci/media-types.js'

const digest = `sha256:${'ab'.repeat(32)}`

test('references: Docker Hub defaults, registries with ports, tags and digests', () => {
  assert.deepEqual(parseReference('busybox'), { registry: 'docker.io', repository: 'library/busybox', tag: 'latest', digest: undefined })
  assert.deepEqual(parseReference('user/app:1.2'), { registry: 'docker.io', repository: 'user/app', tag: '1.2', digest: undefined })
  assert.deepEqual(parseReference('localhost:5000/app'), { registry: 'localhost:5000', repository: 'app', tag: 'latest', digest: undefined })
  assert.deepEqual(parseReference(`ghcr.io/o/r/app:v1@${digest}`), { registry: 'ghcr.io', repository: 'o/r/app', tag: 'v1', digest })
  assert.deepEqual(parseReference(`127.0.0.1:5000/a@${digest}`), { registry: '127.0.0.1:5000', repository: 'a', tag: undefined, digest })
  assert.equal(parseReference('index.docker.io/library/redis:7').registry, 'docker.io')
  assert.equal(formatReference(parseReference('redis')), 'docker.io/library/redis:latest')
})

test('references refused at the edge, with the reason', () => {
  for (const bad of ['', 'Upper/case', 'a:b:c', 'app@sha256:short', 'app:-tag', 'a//b', ' app', 'app:', `app@md5:${'a'.repeat(32)}`, 'bad_host:99999999/app']) {
    assert.throws(() => parseReference(bad), (err: unknown) => err instanceof OciError && err.reason === 'reference-invalid' && err.code === 'UIG_ERR_OCI_REFERENCE_INVALID', bad)
  }
})

test('WWW-Authenticate: several challenges, quoted commas, bare values', () => {
  assert.deepEqual(parseChallenges('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'), [
    { scheme: 'bearer', params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:a/b:pull,push' } }
  ])
  assert.deepEqual(parseChallenges('Basic realm="x", Bearer realm="y",error=invalid_token'), [
    { scheme: 'basic', params: { realm: 'x' } },
    { scheme: 'bearer', params: { realm: 'y', error: 'invalid_token' } }
  ])
})

test('credentials in Docker config.json format: auth, username/password, Docker Hub URL keys', () => {
  const file = CredentialsFile.parse(JSON.stringify({
    auths: {
      'https://index.docker.io/v1/': { auth: Buffer.from('hub:pw:with:colons').toString('base64') },
      'localhost:5000': { username: 'u', password: 'p' }
    }
  }))
  assert.deepEqual(file.lookup('docker.io'), { username: 'hub', password: 'pw:with:colons' })
  assert.deepEqual(file.lookup('localhost:5000'), { username: 'u', password: 'p' })
  assert.equal(file.lookup('ghcr.io'), undefined)
  assert.throws(() => CredentialsFile.parse('{"auths":{"x":{"auth":"bm9jb2xvbg=="}}}'), (err: unknown) => err instanceof OciError && err.reason === 'auth')
  assert.throws(() => CredentialsFile.parse('not json'), (err: unknown) => err instanceof OciError && err.reason === 'auth')
})

test('layer media types: both families, and anything else refused', () => {
  assert.equal(layerCompression('application/vnd.docker.image.rootfs.diff.tar.gzip'), 'gzip')
  assert.equal(layerCompression('application/vnd.oci.image.layer.v1.tar+zstd'), 'zstd')
  assert.equal(layerCompression('application/vnd.oci.image.layer.v1.tar'), 'none')
  assert.throws(() => layerCompression('application/vnd.cncf.helm.chart.content.v1.tar+gzip'), (err: unknown) => err instanceof OciError && err.reason === 'manifest-unsupported')
})
