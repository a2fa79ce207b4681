import assert from 'node:assert/strict'
import { test } from 'node:test'
import { UigniterError } from '../../src/core/errors.js'
import { DEFAULT_SUBNET, Subnet, formatIpv4, parseIpv4 } from '../../src/net/subnet.js'

const invalidSubnet = (fragment: string) => (err: unknown): boolean =>
  err instanceof UigniterError && err.code === 'UIG_ERR_NET_INVALID_SUBNET' && err.message.includes(fragment)

test('subnet: the default is a /24 apart from Docker\'s 172.17.0.0/16', () => {
  const subnet = Subnet.parseForVms(DEFAULT_SUBNET)
  assert.equal(subnet.cidr, '10.77.0.0/24')
  assert.equal(subnet.gateway, '10.77.0.1')
  assert.equal(subnet.gatewayCidr, '10.77.0.1/24')
  assert.equal(subnet.broadcast, '10.77.0.255')
  assert.equal(subnet.netmask, '255.255.255.0')
  assert.equal(subnet.prefix, 24)
  assert.equal(subnet.hostCount, 254)
  assert.equal(subnet.overlaps(Subnet.parse('172.17.0.0/16')), false)
})

test('subnet: hosts() runs from the gateway to the address before broadcast', () => {
  const hosts = [...Subnet.parseForVms('192.168.50.8/29').hosts()]
  assert.deepEqual(hosts, ['192.168.50.9', '192.168.50.10', '192.168.50.11', '192.168.50.12', '192.168.50.13', '192.168.50.14'])
  const big = Subnet.parseForVms('172.20.0.0/16')
  assert.equal(big.hostCount, 65534)
  assert.equal(big.broadcast, '172.20.255.255')
  assert.equal(big.gateway, '172.20.0.1')
})

test('subnet: contains and overlaps', () => {
  const subnet = Subnet.parse('10.77.0.0/24')
  assert.ok(subnet.contains('10.77.0.0'))
  assert.ok(subnet.contains('10.77.0.200'))
  assert.ok(!subnet.contains('10.77.1.1'))
  assert.ok(!subnet.contains('not an address'))
  assert.ok(subnet.overlaps(Subnet.parse('10.0.0.0/8')))
  assert.ok(Subnet.parse('10.0.0.0/8').overlaps(subnet))
  assert.ok(subnet.overlaps(Subnet.containing('10.77.0.130', 25)))
  assert.ok(!subnet.overlaps(Subnet.parse('10.78.0.0/24')))
  assert.equal(Subnet.containing('192.168.1.7', 24).cidr, '192.168.1.0/24')
})

test('subnet: malformed networks and host bits are UIG_ERR_NET_INVALID_SUBNET', () => {
  for (const bad of ['', '10.77.0.0', '10.77.0/24', '10.77.0.0/33', '10.77.0.0/0', '10.077.0.0/24', '256.0.0.0/8', '10.77.0.0/24/1', 'a.b.c.d/24']) {
    assert.throws(() => Subnet.parse(bad), invalidSubnet('CIDR'), bad)
  }
  assert.throws(() => Subnet.parse('10.77.0.5/24'), invalidSubnet('did you mean 10.77.0.0/24'))
})

test('subnet: a VM subnet must be private and /16 to /29', () => {
  assert.throws(() => Subnet.parseForVms('10.0.0.0/8'), invalidSubnet('/16'))
  assert.throws(() => Subnet.parseForVms('10.77.0.0/30'), invalidSubnet('/29'))
  assert.throws(() => Subnet.parseForVms('8.8.8.0/24'), invalidSubnet('not a private range'))
  assert.throws(() => Subnet.parseForVms('172.32.0.0/16'), invalidSubnet('not a private range'))
  assert.throws(() => Subnet.parseForVms('192.169.0.0/16'), invalidSubnet('not a private range'))
  for (const good of ['10.250.3.0/24', '172.31.0.0/16', '192.168.7.0/29']) assert.equal(Subnet.parseForVms(good).cidr, good)
})

test('subnet: IPv4 parsing round-trips and rejects octal-looking octets', () => {
  assert.equal(parseIpv4('255.255.255.255'), 0xffffffff)
  assert.equal(formatIpv4(parseIpv4('10.77.0.1') ?? 0), '10.77.0.1')
  for (const bad of ['1.2.3', '1.2.3.4.5', '01.2.3.4', '1.2.3.256', '1.2.3.-1', ' 1.2.3.4']) assert.equal(parseIpv4(bad), undefined, bad)
})
