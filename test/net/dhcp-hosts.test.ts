import assert from 'node:assert/strict'
import { test } from 'node:test'
import { renderDhcpHosts } from '../../src/net/dhcp-hosts.js'

test('the hosts file: one MAC,IP,infinite per VM, sorted by address, lowercase MACs', () => {
  assert.equal(renderDhcpHosts([
    { mac: '02:AA:bb:cc:dd:01', ip: '10.77.0.10' },
    { mac: '02:aa:bb:cc:dd:02', ip: '10.77.0.9' },
    { mac: '02:aa:bb:cc:dd:03', ip: '10.77.1.2' }
  ]), '02:aa:bb:cc:dd:02,10.77.0.9,infinite\n02:aa:bb:cc:dd:01,10.77.0.10,infinite\n02:aa:bb:cc:dd:03,10.77.1.2,infinite\n')
  assert.equal(renderDhcpHosts([]), '')
})

test('the same VMs in any order give the same bytes', () => {
  const hosts = [{ mac: '02:00:00:00:00:01', ip: '10.77.0.2' }, { mac: '02:00:00:00:00:02', ip: '10.77.0.3' }]
  assert.equal(renderDhcpHosts(hosts), renderDhcpHosts([...hosts].reverse()))
})

test('a malformed MAC or address is refused rather than written for dnsmasq to skip', () => {
  assert.throws(() => renderDhcpHosts([{ mac: '02:00:00:00:00', ip: '10.77.0.2' }]), /not a MAC/)
  assert.throws(() => renderDhcpHosts([{ mac: '02:00:00:00:00:01,10.77.0.3', ip: '10.77.0.2' }]), /not a MAC/)
  assert.throws(() => renderDhcpHosts([{ mac: '02:00:00:00:00:01', ip: '10.77.0.2\nbad' }]), /not an IPv4/)
  assert.throws(() => renderDhcpHosts([{ mac: '02:00:00:00:00:01', ip: '10.77.0.256' }]), /not an IPv4/)
})

test('an address still leased to another MAC lists both, so that dnsmasq hands the lease over', () => {
  const leases = new Map([['10.77.0.2', '02:00:00:00:00:99'], ['10.77.0.3', '02:00:00:00:00:03']])
  assert.equal(renderDhcpHosts([{ mac: '02:00:00:00:00:01', ip: '10.77.0.2' }, { mac: '02:00:00:00:00:03', ip: '10.77.0.3' }], leases),
    '02:00:00:00:00:01,02:00:00:00:00:99,10.77.0.2,infinite\n02:00:00:00:00:03,10.77.0.3,infinite\n')
})
