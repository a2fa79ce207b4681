import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { DhcpHost, DhcpHosts } from '../../src/net/dhcp-hosts.js'
import { HostNetwork } from '../../src/net/host-network.js'
import { Subnet } from '../../src/net/subnet.js'
import { InMemoryIpAllocationStore } from './in-memory-ip-allocation-store.js'
import { CleanupStack, freeSubnets, testPrefix } from './net-fixtures.js'

/** The DHCP table as HostNetwork hands it over, each time it does (a DhcpHosts of the test's own, as the port allows). */
class RecordedDhcpHosts implements DhcpHosts {
  readonly tables: DhcpHost[][] = []
  async setHosts (hosts: DhcpHost[]): Promise<void> {
    this.tables.push(hosts)
    await Promise.resolve()
  }
}

test('owners attached without DHCP are not in its table, and their starts and ends do not rewrite it; the others do', async (t) => {
  const cleanup = new CleanupStack()
  t.after(async () => await cleanup.run())
  const prefix = testPrefix()
  const [cidr = ''] = await freeSubnets(1)
  const network = new HostNetwork({ bridge: `${prefix}br`, subnet: Subnet.parseForVms(cidr).cidr, nat: false, store: new InMemoryIpAllocationStore(), tapPrefix: prefix, firewallTable: prefix })
  cleanup.push(async () => await network.teardown())
  await network.setup()
  const dhcp = new RecordedDhcpHosts()
  await network.useDhcp(dhcp)
  const written = (): number => dhcp.tables.length
  const last = (): string[] => (dhcp.tables.at(-1) ?? []).map((h) => h.ip)

  const before = written()
  const clone = await network.attach(`${prefix}-clone`, { dhcp: false })
  await network.detach(`${prefix}-clone`)
  assert.equal(written(), before, 'a guest without DHCP changed nothing in the table')

  const unikernel = await network.attach(`${prefix}-uk`)
  assert.equal(written(), before + 1)
  assert.deepEqual(last(), [unikernel.ip])
  const quiet = await network.attach(`${prefix}-quiet`, { dhcp: false })
  assert.equal(written(), before + 1)
  assert.ok(!network.dhcpHosts().some((h) => h.ip === quiet.ip), 'listed only when it takes DHCP')
  // The same owner again, now without DHCP (re-attached): it leaves the table.
  await network.attach(`${prefix}-uk`, { dhcp: false })
  assert.equal(written(), before + 2)
  assert.deepEqual(last(), [])
  assert.notEqual(clone.ip, '')
})
