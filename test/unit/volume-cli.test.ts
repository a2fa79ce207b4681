import assert from 'node:assert/strict'
import { describe, test } from 'node:test'
import { UigniterError } from '../../src/core/errors.js'
import { parseVolumeFlag } from '../../src/cli/vm-commands.js'
import { parseLabels, parseVolumeSize } from '../../src/cli/volume-commands.js'

function refused (fn: () => unknown, ...fragments: string[]): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof UigniterError, `a UigniterError, not ${String(err)}`)
    assert.equal(err.code, 'UIG_ERR_CLI_USAGE')
    for (const fragment of fragments) assert.ok(err.message.includes(fragment), `"${err.message}" should mention "${fragment}"`)
    return true
  })
}

describe('volume create --size', () => {
  test('suffixes M, G, T in any case, with or without iB; a bare number is MiB', () => {
    for (const [text, mib] of [
      ['512', 512], ['512M', 512], ['512m', 512], ['512MiB', 512], ['512MB', 512],
      ['10G', 10240], ['10g', 10240], ['10GiB', 10240], ['1T', 1024 * 1024], ['1.5G', 1536], [' 64M ', 64]
    ] as const) {
      assert.equal(parseVolumeSize(text), mib, text)
    }
  })

  test('zero, junk, negative sizes, fractions of a MiB and unknown units are refused, naming the flag and the value', () => {
    for (const text of ['0', '0G', '', 'big', '-5', '10K', '10 GB', '1.5', '0.0001G', '1e3', '10GG', 'G', '12x']) {
      refused(() => parseVolumeSize(text), '--size', `"${text}"`)
    }
  })

  test('labels are K=V; a pair without a key or without = is refused', () => {
    assert.deepEqual(parseLabels(['tier=db', 'empty=', 'eq=a=b']), { tier: 'db', empty: '', eq: 'a=b' })
    assert.deepEqual(parseLabels(undefined), {})
    refused(() => parseLabels(['novalue']), '--label', 'novalue')
    refused(() => parseLabels(['=v']), '--label')
  })
})

describe('run -v', () => {
  test('an absolute source stays a 9p share of a host directory, read-only unless :rw, as before', () => {
    assert.deepEqual(parseVolumeFlag('/srv/www:/www'), { share: { hostPath: '/srv/www', guestPath: '/www', readOnly: true } })
    assert.deepEqual(parseVolumeFlag('/srv/www:/www:ro'), { share: { hostPath: '/srv/www', guestPath: '/www', readOnly: true } })
    assert.deepEqual(parseVolumeFlag('/srv/www:/www:rw'), { share: { hostPath: '/srv/www', guestPath: '/www', readOnly: false } })
  })

  test('a volume name is a volume, read-write unless :ro (:rw accepted too)', () => {
    assert.deepEqual(parseVolumeFlag('data:/var/lib/app'), { volume: { name: 'data', guestPath: '/var/lib/app', readOnly: false } })
    assert.deepEqual(parseVolumeFlag('data:/var/lib/app:rw'), { volume: { name: 'data', guestPath: '/var/lib/app', readOnly: false } })
    assert.deepEqual(parseVolumeFlag('web-data-0:/d:ro'), { volume: { name: 'web-data-0', guestPath: '/d', readOnly: true } })
    assert.deepEqual(parseVolumeFlag('a.b_c:/x'), { volume: { name: 'a.b_c', guestPath: '/x', readOnly: false } })
  })

  test('anything else is refused with a message that shows both forms', () => {
    for (const text of ['data', 'data:', 'data:relative', './data:/d', 'data/x:/d', 'Data:/d', '-data:/d', 'data:/d:rx', 'data:/d:ro:rw', ':/d', '/host:relative', `${'a'.repeat(64)}:/d`]) {
      refused(() => parseVolumeFlag(text), '/HOST/DIR:/GUEST/DIR', 'VOLUME:/GUEST/DIR', `"${text}"`)
    }
  })
})
