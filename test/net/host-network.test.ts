import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { freePort } from '../../src/core/free-port.js'
import { HostNetwork, type VmNetwork } from '../../src/net/host-network.js'
import { Subnet } from '../../src/net/subnet.js'
import { tapNameFor } from '../../src/net/tap.js'
import { rejectsWith } from '../helpers/assertions.js'
import { InMemoryIpAllocationStore } from './in-memory-ip-allocation-store.js'
import {
  CleanupStack, addNamespace, fetchFromHost, fetchFromNamespace, freeSubnets, holdPort, ipLink,
  sendRawSyn, serveInNamespace, serveOnHost, sh, testPrefix, type Fetched
} from './net-fixtures.js'

/**
 * The bridge network end to end, with network namespaces for guests: a
 * namespace on a veth pair into the bridge has the same view of the host as a
 * QEMU guest on a tap. A second namespace, routed through the host, is "the
 * world outside" for NAT. Every address used is on this machine.
 */

const GUEST_PORT = 8000
const OUTSIDE_PORT = 9000
/** Long enough for a local answer, short for the checks that expect a drop. */
const DROP_WAIT_MS = 700

const answered = (fetched: Fetched): string => {
  assert.ok(fetched.ok, `expected an answer, got ${fetched.ok ? '' : fetched.error}`)
  return fetched.body
}

const notAnswered = (fetched: Fetched): void => {
  assert.ok(!fetched.ok, `expected no answer, got "${fetched.ok ? fetched.body : ''}"`)
}

async function nftTable (table: string): Promise<string> {
  return await sh('nft', 'list', 'table', 'ip', table)
}

describe('host network: bridge, taps, NAT, published ports and isolation', () => {
  const cleanup = new CleanupStack()
  const prefix = testPrefix()
  const bridge = `${prefix}br`
  const store = new InMemoryIpAllocationStore()
  let subnet: Subnet
  let outsideCidr: Subnet
  let network: HostNetwork
  let resolvConf: string
  let vm: VmNetwork
  const vmId = `${prefix}-web`
  const vmNs = `${prefix}-vm`
  const outsideNs = `${prefix}-out`

  const newNetwork = (nat: boolean): HostNetwork => new HostNetwork({
    bridge, subnet: subnet.cidr, nat, store, tapPrefix: prefix, firewallTable: prefix, resolvConf
  })

  before(async () => {
    const [vmCidr = '', outside = ''] = await freeSubnets(2)
    subnet = Subnet.parseForVms(vmCidr)
    outsideCidr = Subnet.parseForVms(outside)
    const dir = await mkdtemp(join(tmpdir(), `${prefix}-`))
    cleanup.push(async () => await rm(dir, { recursive: true, force: true }))
    resolvConf = join(dir, 'resolv.conf')
    await writeFile(resolvConf, 'search example\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\n')
    network = newNetwork(true)
    cleanup.push(async () => await network.teardown())
  })

  after(async () => await cleanup.run())

  test('setup creates the bridge and the firewall table, and is idempotent', async () => {
    await network.setup()
    await network.setup()
    const link = await ipLink(bridge)
    assert.equal(link?.linkinfo?.info_kind, 'bridge')
    assert.ok(link?.addr_info?.some((a) => a.local === subnet.gateway && a.prefixlen === subnet.prefix))
    const table = await nftTable(prefix)
    for (const chain of ['guard', 'prerouting', 'output', 'postrouting', 'input', 'forward', 'publish']) {
      assert.match(table, new RegExp(`chain ${chain} \\{`))
    }
    assert.match(table, new RegExp(`ip saddr ${subnet.cidr.replace(/\./g, '\\.')} oifname != "${bridge}" fib saddr type != local masquerade`))
  })

  test('attach gives an address, a MAC and a tap on the bridge; again, the same', async () => {
    vm = await network.attach(vmId)
    assert.deepEqual(vm, {
      tap: tapNameFor(vmId, prefix),
      mac: vm.mac,
      ip: [...subnet.hosts()][1],
      prefix: 24,
      gateway: subnet.gateway,
      dns: ['10.255.255.53']
    })
    assert.match(vm.mac, /^02:/)
    const tap = await ipLink(vm.tap)
    assert.equal(tap?.master, bridge)
    assert.deepEqual(await network.attach(vmId), vm)

    // The guest: a namespace on the bridge with the VM's address, MAC and route.
    await addNamespace(cleanup, {
      name: vmNs, hostSide: `${prefix}vh`, nsSide: `${prefix}vg`, master: bridge,
      address: `${vm.ip}/${vm.prefix}`, gateway: vm.gateway, mac: vm.mac
    })
    await serveInNamespace(cleanup, vmNs, '0.0.0.0', GUEST_PORT, 'vm')
    // The host reaches the guest directly (answers pass the bridge's input rules).
    assert.equal(answered(await fetchFromHost(vm.ip, GUEST_PORT)), `vm from ${subnet.gateway}`)
  })

  test('a port published on 0.0.0.0 answers on 127.0.0.1 and on the gateway address', async () => {
    const hostPort = await freePort('0.0.0.0')
    await network.publish(vmId, [{ hostAddress: '0.0.0.0', hostPort, guestPort: GUEST_PORT }])
    // 127.0.0.1-sourced connections reach the guest masqueraded as the gateway.
    assert.equal(answered(await fetchFromHost('127.0.0.1', hostPort)), `vm from ${subnet.gateway}`)
    assert.equal(answered(await fetchFromHost(subnet.gateway, hostPort)), `vm from ${subnet.gateway}`)
    assert.match(await nftTable(prefix), new RegExp(`comment "uigniter vm=${vmId} tcp 0\\.0\\.0\\.0:${hostPort}->`))
  })

  test('a port published on 127.0.0.1 answers there only; publishing it again is a no-op', async () => {
    const hostPort = await freePort('0.0.0.0')
    await network.publish(vmId, [{ hostPort, guestPort: GUEST_PORT }])
    await network.publish(vmId, [{ hostPort, guestPort: GUEST_PORT }])
    assert.equal(answered(await fetchFromHost('127.0.0.1', hostPort)), `vm from ${subnet.gateway}`)
    assert.deepEqual(await fetchFromHost(subnet.gateway, hostPort), { ok: false, error: 'ECONNREFUSED' })
  })

  test('isolation: a guest reaches neither published ports through the host nor host services', async () => {
    const published = await freePort('0.0.0.0')
    await network.publish(vmId, [{ hostAddress: '0.0.0.0', hostPort: published, guestPort: GUEST_PORT }])
    // The world outside, with a host address (its end of the veth) that is not on the bridge.
    await addNamespace(cleanup, {
      name: outsideNs, hostSide: `${prefix}oh`, nsSide: `${prefix}og`,
      address: `${[...outsideCidr.hosts()][1] ?? ''}/${outsideCidr.prefix}`, hostAddress: outsideCidr.gatewayCidr
    })
    const onGateway = await serveOnHost(cleanup, subnet.gateway, 0, 'host')
    const onOtherAddress = await serveOnHost(cleanup, outsideCidr.gateway, 0, 'host')
    // Sanity: the host itself reaches all three.
    assert.equal(answered(await fetchFromHost(subnet.gateway, onGateway)), `host from ${subnet.gateway}`)
    assert.equal(answered(await fetchFromHost(outsideCidr.gateway, onOtherAddress)), `host from ${outsideCidr.gateway}`)
    answered(await fetchFromHost(subnet.gateway, published))

    const [a, b, c, d] = await Promise.all([
      fetchFromNamespace(vmNs, subnet.gateway, published, DROP_WAIT_MS),
      fetchFromNamespace(vmNs, outsideCidr.gateway, published, DROP_WAIT_MS),
      fetchFromNamespace(vmNs, subnet.gateway, onGateway, DROP_WAIT_MS),
      fetchFromNamespace(vmNs, outsideCidr.gateway, onOtherAddress, DROP_WAIT_MS)
    ])
    for (const fetched of [a, b, c, d]) notAnswered(fetched)

    // The allow-list opens a port on the gateway address, and nothing else.
    const allowing = new HostNetwork({
      bridge, subnet: subnet.cidr, nat: true, store, tapPrefix: prefix, firewallTable: prefix, resolvConf, allowedHostPorts: [onGateway, onOtherAddress]
    })
    await allowing.setup()
    try {
      assert.equal(answered(await fetchFromNamespace(vmNs, subnet.gateway, onGateway)), `host from ${vm.ip}`)
      notAnswered(await fetchFromNamespace(vmNs, outsideCidr.gateway, onOtherAddress, DROP_WAIT_MS))
    } finally {
      await network.setup()
    }
    notAnswered(await fetchFromNamespace(vmNs, subnet.gateway, onGateway, DROP_WAIT_MS))
    // The guest still reaches itself by its own address.
    assert.equal(answered(await fetchFromNamespace(vmNs, vm.ip, GUEST_PORT)), `vm from ${vm.ip}`)
  })

  test('isolation: a guest\'s hand-made packets to 127.0.0.1 through the bridge (route_localnet is on there) get no answer', async () => {
    const onLoopback = await serveOnHost(cleanup, '127.0.0.1', 0, 'host')
    // Counts the host's SYN-ACKs from that port: proof that the host took a guest's SYN.
    const counters = `${prefix}c`
    await sh('nft', [
      `add table ip ${counters}`,
      `add chain ip ${counters} out { type filter hook output priority -400; }`,
      `add rule ip ${counters} out tcp sport ${onLoopback} tcp flags & (syn | ack) == syn | ack counter`
    ].join('\n'))
    cleanup.push(async () => await sh('nft', 'delete', 'table', 'ip', counters))
    const synAcks = async (): Promise<number> => Number(/packets (\d+)/.exec(await sh('nft', 'list', 'chain', 'ip', counters, 'out'))?.[1])
    const frame = { iface: `${prefix}vg`, srcMac: vm.mac, dstMac: (await ipLink(bridge))?.address ?? '', srcIp: vm.ip, dstIp: '127.0.0.1', dstPort: onLoopback }

    await sendRawSyn(vmNs, frame)
    // Nothing to wait for when the packet is dropped: give it a moment, then count.
    await new Promise((resolve) => setTimeout(resolve, 300))
    assert.equal(await synAcks(), 0)

    // Control: without the guard and input rules, the same frame is answered.
    await sh('nft', 'flush', 'chain', 'ip', prefix, 'guard')
    await sh('nft', 'flush', 'chain', 'ip', prefix, 'input')
    try {
      await sendRawSyn(vmNs, frame)
      const deadline = Date.now() + 3000
      while (await synAcks() === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50))
      assert.equal(await synAcks(), 1)
    } finally {
      await network.setup()
    }
  })

  test('two guests on the bridge reach each other directly, with NAT and without', async () => {
    const peerId = `${prefix}-peer`
    const peerNs = `${prefix}-pe`
    const peer = await network.attach(peerId)
    await addNamespace(cleanup, {
      name: peerNs, hostSide: `${prefix}ph`, nsSide: `${prefix}pg`, master: bridge,
      address: `${peer.ip}/${peer.prefix}`, gateway: peer.gateway, mac: peer.mac
    })
    assert.equal(answered(await fetchFromNamespace(peerNs, vm.ip, GUEST_PORT)), `vm from ${peer.ip}`)
    await newNetwork(false).setup()
    try {
      assert.equal(answered(await fetchFromNamespace(peerNs, vm.ip, GUEST_PORT)), `vm from ${peer.ip}`)
    } finally {
      await network.setup()
    }
    await network.detach(peerId)
  })

  test('NAT: a guest reaches a network beyond the host, masqueraded; with nat off, it does not', async () => {
    const outsideIp = [...outsideCidr.hosts()][1] ?? ''
    await serveInNamespace(cleanup, outsideNs, outsideIp, OUTSIDE_PORT, 'outside')
    assert.equal(answered(await fetchFromNamespace(vmNs, outsideIp, OUTSIDE_PORT)), `outside from ${outsideCidr.gateway}`)

    const noNat = newNetwork(false)
    await noNat.setup()
    try {
      assert.doesNotMatch(await nftTable(prefix), /oifname != "[^"]+" masquerade/)
      notAnswered(await fetchFromNamespace(vmNs, outsideIp, OUTSIDE_PORT, DROP_WAIT_MS))
      // Published ports still work without NAT.
      const hostPort = await freePort('0.0.0.0')
      await noNat.publish(vmId, [{ hostPort, guestPort: GUEST_PORT }])
      answered(await fetchFromHost('127.0.0.1', hostPort))
    } finally {
      await network.setup()
    }
    answered(await fetchFromNamespace(vmNs, outsideIp, OUTSIDE_PORT))
  })

  test('port collisions: published already, held by a host program, twice in one request', async () => {
    const other = `${prefix}-other`
    await network.attach(other)
    const taken = await freePort('0.0.0.0')
    await network.publish(vmId, [{ hostAddress: '0.0.0.0', hostPort: taken, guestPort: GUEST_PORT }])
    await rejectsWith(network.publish(other, [{ hostPort: taken, guestPort: 80 }]), 'UIG_ERR_NET_PORT_IN_USE', `already published for VM ${vmId}`)
    await rejectsWith(network.publish(other, [{ hostAddress: subnet.gateway, hostPort: taken, guestPort: 80 }]), 'UIG_ERR_NET_PORT_IN_USE', String(taken))

    const held = await freePort('0.0.0.0')
    await holdPort(cleanup, '127.0.0.1', held)
    await rejectsWith(network.publish(other, [{ hostAddress: '0.0.0.0', hostPort: held, guestPort: 80 }]), 'UIG_ERR_NET_PORT_IN_USE', 'in use by a program')

    const twice = await freePort('0.0.0.0')
    await rejectsWith(network.publish(other, [{ hostPort: twice, guestPort: 80 }, { hostAddress: '0.0.0.0', hostPort: twice, guestPort: 81 }]),
      'UIG_ERR_NET_PORT_IN_USE', 'twice')

    // All or nothing: the free port of a failed request is not left published.
    const free = await freePort('0.0.0.0')
    await rejectsWith(network.publish(other, [{ hostPort: free, guestPort: 80 }, { hostPort: taken, guestPort: 81 }]), 'UIG_ERR_NET_PORT_IN_USE')
    assert.doesNotMatch(await nftTable(prefix), new RegExp(`:${free}->`))

    await rejectsWith(network.publish(other, [{ hostAddress: '10.250.255.254', hostPort: free, guestPort: 80 }]), 'UIG_ERR_NET_PUBLISH_INVALID', 'not an address of this host')
    await rejectsWith(network.publish('never-attached', [{ hostPort: free, guestPort: 80 }]), 'UIG_ERR_NET_NOT_ATTACHED')
    await network.detach(other)
  })

  test('orphan cleanup removes the taps and port forwards of VMs that are gone, and keeps the live ones', async () => {
    const orphan = `${prefix}-orphan`
    const { tap } = await network.attach(orphan)
    const orphanPort = await freePort('0.0.0.0')
    await network.publish(orphan, [{ hostPort: orphanPort, guestPort: 80 }])
    const livePublishes = (await nftTable(prefix)).match(new RegExp(`vm=${vmId} `, 'g'))?.length ?? 0
    assert.ok(livePublishes > 0)

    // A restarted daemon: new objects over the same host state.
    const restarted = newNetwork(true)
    await restarted.setup()
    const removed = await restarted.cleanupOrphans([vmId])
    assert.deepEqual(removed.taps, [tap])
    assert.deepEqual(removed.publishes.map((p) => [p.vmId, p.hostPort]), [[orphan, orphanPort]])
    assert.equal(await ipLink(tap), undefined)
    assert.ok(await ipLink(vm.tap))
    const table = await nftTable(prefix)
    assert.doesNotMatch(table, new RegExp(`vm=${orphan} `))
    assert.equal(table.match(new RegExp(`vm=${vmId} `, 'g'))?.length, livePublishes)
    // IP allocations are the caller's to release.
    assert.ok(restarted.ipam.lookup(orphan))
    restarted.ipam.release(orphan)
  })

  test('detach removes the tap and the port forwards and frees the address; teardown removes everything', async () => {
    await network.detach(vmId)
    await network.detach(vmId)
    assert.equal(await ipLink(vm.tap), undefined)
    assert.doesNotMatch(await nftTable(prefix), /uigniter vm=/)
    assert.equal(network.ipam.lookup(vmId), undefined)

    await network.teardown()
    assert.equal(await ipLink(bridge), undefined)
    assert.doesNotMatch(await sh('nft', 'list', 'tables'), new RegExp(`ip ${prefix}\\b`))
  })
})
