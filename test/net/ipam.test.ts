import assert from 'node:assert/strict'
import { test } from 'node:test'
import { UigniterError } from '../../src/core/errors.js'
import { Ipam, type IpAllocationStore } from '../../src/net/ipam.js'
import { Subnet } from '../../src/net/subnet.js'
import { InMemoryIpAllocationStore } from './in-memory-ip-allocation-store.js'

const subnet29 = Subnet.parseForVms('10.250.0.0/29')

test('ipam: lowest free address first, skipping network, gateway and broadcast', () => {
  const ipam = new Ipam(subnet29, new InMemoryIpAllocationStore())
  assert.equal(ipam.capacity, 5)
  const ips = ['a', 'b', 'c', 'd', 'e'].map((owner) => ipam.allocate(owner))
  assert.deepEqual(ips, ['10.250.0.2', '10.250.0.3', '10.250.0.4', '10.250.0.5', '10.250.0.6'])
})

test('ipam: allocate is idempotent per owner; release frees the address for the next', () => {
  const store = new InMemoryIpAllocationStore()
  const ipam = new Ipam(subnet29, store)
  assert.equal(ipam.allocate('a'), '10.250.0.2')
  assert.equal(ipam.allocate('b'), '10.250.0.3')
  assert.equal(ipam.allocate('a'), '10.250.0.2')
  assert.equal(store.byIp.size, 2)
  assert.equal(ipam.lookup('b'), '10.250.0.3')
  ipam.release('a')
  assert.equal(ipam.lookup('a'), undefined)
  assert.equal(ipam.allocate('c'), '10.250.0.2')
  ipam.release('nobody')
})

test('ipam: allocations persist in the store, so a new Ipam (a restarted daemon) hands out no address twice', () => {
  const store = new InMemoryIpAllocationStore()
  new Ipam(subnet29, store).allocate('a')
  const again = new Ipam(subnet29, store)
  assert.equal(again.allocate('a'), '10.250.0.2')
  assert.equal(again.allocate('b'), '10.250.0.3')
})

test('ipam: an address taken between list() and reserve() is skipped', () => {
  const store = new InMemoryIpAllocationStore()
  // Another allocator wins 10.250.0.2 after this one listed the allocations.
  const racing: IpAllocationStore = {
    list: () => store.list(),
    reserve: (ip, owner) => {
      if (ip === '10.250.0.2' && !store.byIp.has(ip)) store.reserve(ip, 'other')
      return store.reserve(ip, owner)
    },
    release: (ip) => store.release(ip),
    releaseOwner: (owner) => store.releaseOwner(owner)
  }
  assert.equal(new Ipam(subnet29, racing).allocate('a'), '10.250.0.3')
  assert.equal(store.byIp.get('10.250.0.2'), 'other')
})

test('ipam: an address from a previously configured subnet is replaced', () => {
  const store = new InMemoryIpAllocationStore()
  store.reserve('10.77.0.9', 'a')
  assert.equal(new Ipam(subnet29, store).allocate('a'), '10.250.0.2')
  assert.deepEqual(store.list(), [{ ip: '10.250.0.2', owner: 'a' }])
})

test('ipam: a full subnet is UIG_ERR_NET_POOL_EXHAUSTED, saying which and how full', () => {
  const ipam = new Ipam(subnet29, new InMemoryIpAllocationStore())
  for (const owner of ['a', 'b', 'c', 'd', 'e']) ipam.allocate(owner)
  assert.throws(() => ipam.allocate('f'), (err: unknown) => {
    assert.ok(err instanceof UigniterError)
    assert.equal(err.code, 'UIG_ERR_NET_POOL_EXHAUSTED')
    assert.equal(err.statusCode, 503)
    assert.match(err.message, /10\.250\.0\.0\/29: 5 of 5 in use/)
    assert.match(err.message, /larger network\.subnet/)
    return true
  })
  // Owners that have an address still get it.
  assert.equal(ipam.allocate('c'), '10.250.0.4')
  ipam.release('c')
  assert.equal(ipam.allocate('f'), '10.250.0.4')
})
