import assert from 'node:assert/strict'
import { chmod, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test } from 'node:test'
import { deleteBridge, ensureBridge } from '../../src/net/bridge.js'
import { detectFirewall } from '../../src/net/detect-firewall.js'
import type { PortPublish } from '../../src/net/firewall.js'
import { NftFirewall } from '../../src/net/nft-firewall.js'
import { Subnet } from '../../src/net/subnet.js'
import { rejectsWith } from '../helpers/assertions.js'
import { freePort } from '../../src/core/free-port.js'
import { CleanupStack, freeSubnets, sh, testPrefix } from './net-fixtures.js'

test('nftables: base rules are rewritten in place, port forwards survive, reconcile adds and removes, destroy deletes the table', async (t) => {
  const cleanup = new CleanupStack()
  t.after(async () => await cleanup.run())
  const prefix = testPrefix()
  const bridge = `${prefix}br`
  const subnet = Subnet.parseForVms((await freeSubnets(1))[0] ?? '')
  cleanup.push(async () => await deleteBridge(bridge))
  await ensureBridge({ name: bridge, subnet })
  const firewall = new NftFirewall({ table: prefix })
  cleanup.push(async () => await firewall.destroy())

  await rejectsWith(firewall.publish('a', { hostAddress: '127.0.0.1', hostPort: 1, vmIp: '10.0.0.2', guestPort: 1 }), 'UIG_ERR_NET_SETUP_FAILED', 'ensureBase')
  assert.deepEqual(await firewall.listPublished(), [])

  await rejectsWith(firewall.ensureBase({ bridge: `${prefix}no`, subnet, nat: true }), 'UIG_ERR_NET_SETUP_FAILED', `bridge ${prefix}no does not exist`)
  await firewall.ensureBase({ bridge, subnet, nat: true, allowedHostPorts: [7000, 7001] })
  assert.equal((await sh('cat', `/proc/sys/net/ipv4/conf/${bridge}/route_localnet`)).trim(), '1')
  assert.equal((await sh('cat', '/proc/sys/net/ipv4/ip_forward')).trim(), '1')
  assert.match(await sh('nft', 'list', 'chain', 'ip', prefix, 'input'), new RegExp(`ip daddr ${subnet.gateway.replace(/\./g, '\\.')} tcp dport \\{ 7000, 7001 \\} accept`))

  const [ip1 = '', ip2 = ''] = [...subnet.hosts()].slice(1)
  const [h1, h2, h3, h4] = [await freePort('0.0.0.0'), await freePort('0.0.0.0'), await freePort('0.0.0.0'), await freePort('0.0.0.0')]
  const p1: PortPublish = { hostAddress: '127.0.0.1', hostPort: h1, vmIp: ip1, guestPort: 80 }
  const p2: PortPublish = { hostAddress: '0.0.0.0', hostPort: h2, vmIp: ip1, guestPort: 81 }
  const p3: PortPublish = { hostAddress: subnet.gateway, hostPort: h3, vmIp: ip1, guestPort: 82 }
  const q1: PortPublish = { hostAddress: '127.0.0.1', hostPort: h4, vmIp: ip2, guestPort: 80 }
  await firewall.publish('vm-a', p1)
  await firewall.publish('vm-a', p2)
  await firewall.publish('vm-b', q1)
  const sorted = async (): Promise<string[]> => (await firewall.listPublished()).map((p) => `${p.vmId} ${p.hostAddress}:${p.hostPort}->${p.vmIp}:${p.guestPort}`).sort()
  assert.deepEqual(await sorted(), [`vm-a 0.0.0.0:${h2}->${ip1}:81`, `vm-a 127.0.0.1:${h1}->${ip1}:80`, `vm-b 127.0.0.1:${h4}->${ip2}:80`])

  // Base rules again, now without NAT and allowed ports: the forwards stay.
  await firewall.ensureBase({ bridge, subnet, nat: false })
  const table = await sh('nft', 'list', 'table', 'ip', prefix)
  assert.doesNotMatch(table, /fib saddr type != local masquerade/)
  assert.doesNotMatch(table, /7000/)
  assert.match(table, new RegExp(`iifname "${bridge}" oifname != "${bridge}" drop`))
  assert.equal((await sorted()).length, 3)

  // vm-a should have p1 and p3 (p2 goes, p3 comes); vm-b is gone.
  await firewall.reconcile([{ vmId: 'vm-a', publishes: [p1, p3] }])
  assert.deepEqual(await sorted(), [`vm-a ${subnet.gateway}:${h3}->${ip1}:82`, `vm-a 127.0.0.1:${h1}->${ip1}:80`].sort())
  await firewall.reconcile([{ vmId: 'vm-a' }])
  assert.equal((await sorted()).length, 2)

  await firewall.unpublish('vm-a', p3)
  assert.deepEqual(await sorted(), [`vm-a 127.0.0.1:${h1}->${ip1}:80`])
  await firewall.unpublishAll('vm-a')
  assert.deepEqual(await firewall.listPublished(), [])

  await firewall.destroy()
  await firewall.destroy()
  assert.doesNotMatch(await sh('nft', 'list', 'tables'), new RegExp(`ip ${prefix}\\b`))
})

test('nftables: malformed forwards are UIG_ERR_NET_PUBLISH_INVALID before anything runs', async () => {
  const firewall = new NftFirewall({ table: 'uigt_never_created' })
  const good: PortPublish = { hostAddress: '127.0.0.1', hostPort: 8080, vmIp: '10.77.0.2', guestPort: 80 }
  await rejectsWith(firewall.publish('a', { ...good, hostAddress: 'localhost' }), 'UIG_ERR_NET_PUBLISH_INVALID', 'localhost')
  await rejectsWith(firewall.publish('a', { ...good, vmIp: '10.77.0.2; flush ruleset' }), 'UIG_ERR_NET_PUBLISH_INVALID')
  await rejectsWith(firewall.publish('a', { ...good, hostPort: 0 }), 'UIG_ERR_NET_PUBLISH_INVALID', '1 to 65535')
  await rejectsWith(firewall.publish('a', { ...good, guestPort: 70000 }), 'UIG_ERR_NET_PUBLISH_INVALID')
  await assert.rejects(firewall.publish('a b"', good), /VM id/)
  assert.throws(() => new NftFirewall({ table: 'bad table' }), /table name/)
})

test('firewall detection: nftables here; a host without nft gets an error naming the package', async (t) => {
  assert.equal((await detectFirewall({ table: 'uigt_detect' })).backend, 'nftables')

  // Hosts without nft cannot be had on this machine: a PATH without it stands in.
  const dir = await mkdtemp(join(tmpdir(), 'uigt-path-'))
  const savedPath = process.env.PATH
  t.after(async () => {
    process.env.PATH = savedPath
    await rm(dir, { recursive: true, force: true })
  })
  process.env.PATH = dir
  await rejectsWith(detectFirewall(), 'UIG_ERR_HOST_MISSING_TOOL', 'neither nft nor iptables', 'apt-get install nftables', 'network: user')
  // An "iptables" that only answers --version: the stand-in for an iptables-only host.
  await writeFile(join(dir, 'iptables'), '#!/bin/sh\necho "iptables v1.8.9 (stand-in)"\n')
  await chmod(join(dir, 'iptables'), 0o755)
  await rejectsWith(detectFirewall(), 'UIG_ERR_HOST_MISSING_TOOL', 'has iptables but not nftables', 'apt-get install nftables')
  await symlink('/usr/sbin/nft', join(dir, 'nft'))
  assert.equal((await detectFirewall()).backend, 'nftables')
})
