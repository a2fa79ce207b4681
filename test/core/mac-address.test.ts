import assert from 'node:assert/strict'
import { test } from 'node:test'
import { macForVm } from '../../src/core/mac-address.js'

test('mac: locally administered unicast, stable per VM id, different between ids', () => {
  const mac = macForVm('vm-1')
  assert.match(mac, /^02(:[0-9a-f]{2}){5}$/)
  const first = parseInt(mac.slice(0, 2), 16)
  assert.equal(first & 0b10, 0b10, 'locally administered bit set')
  assert.equal(first & 0b01, 0, 'unicast')
  assert.equal(macForVm('vm-1'), mac)
  const many = new Set(Array.from({ length: 1000 }, (_, i) => macForVm(`vm-${i}`)))
  assert.equal(many.size, 1000)
})
