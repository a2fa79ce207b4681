import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { test } from 'node:test'
import { run } from '../../src/core/exec.js'
import { packageRoot } from '../../src/core/package-paths.js'
import { deleteBridge, ensureBridge } from '../../src/net/bridge.js'
import { Subnet } from '../../src/net/subnet.js'
import { createTap, deleteTap, listTaps, tapNameFor } from '../../src/net/tap.js'
import { rejectsWith } from '../helpers/assertions.js'
import { CleanupStack, freeSubnets, ipLink, sh, testPrefix } from './net-fixtures.js'

test('bridge: created with the gateway address, a fixed MAC, IPv6 off, up; ensuring again changes nothing', async (t) => {
  const cleanup = new CleanupStack()
  t.after(async () => await cleanup.run())
  const name = `${testPrefix()}br`
  const [cidr = ''] = await freeSubnets(1)
  const subnet = Subnet.parseForVms(cidr)
  cleanup.push(async () => await deleteBridge(name))

  await ensureBridge({ name, subnet })
  const link = await ipLink(name)
  assert.equal(link?.linkinfo?.info_kind, 'bridge')
  assert.ok(link?.flags?.includes('UP'))
  assert.match(link?.address ?? '', /^02:/)
  assert.deepEqual(link?.addr_info?.filter((a) => a.family === 'inet').map((a) => `${a.local}/${a.prefixlen}`), [subnet.gatewayCidr])
  assert.equal(link?.addr_info?.some((a) => a.family === 'inet6'), false)
  assert.equal((await readFile(`/proc/sys/net/ipv6/conf/${name}/disable_ipv6`, 'utf8')).trim(), '1')

  await ensureBridge({ name, subnet })
  const again = await ipLink(name)
  assert.deepEqual([again?.ifindex, again?.address, again?.flags, again?.addr_info], [link?.ifindex, link?.address, link?.flags, link?.addr_info])
})

test('bridge: a bridge with another address, a non-bridge device of that name, or an overlapping subnet are conflicts', async (t) => {
  const cleanup = new CleanupStack()
  t.after(async () => await cleanup.run())
  const prefix = testPrefix()
  const [a = '', b = ''] = await freeSubnets(2)
  const first = `${prefix}br`
  cleanup.push(async () => await deleteBridge(first))
  await ensureBridge({ name: first, subnet: Subnet.parseForVms(a) })

  await rejectsWith(ensureBridge({ name: first, subnet: Subnet.parseForVms(b) }), 'UIG_ERR_NET_BRIDGE_CONFLICT',
    first, Subnet.parseForVms(a).gatewayCidr, Subnet.parseForVms(b).gatewayCidr)

  const second = `${prefix}b2`
  cleanup.push(async () => await deleteBridge(second))
  // The same /24 as the first bridge, or a /16 around it.
  await rejectsWith(ensureBridge({ name: second, subnet: Subnet.parseForVms(a) }), 'UIG_ERR_NET_SUBNET_CONFLICT', first)
  await rejectsWith(ensureBridge({ name: second, subnet: Subnet.parseForVms('10.250.0.0/16') }), 'UIG_ERR_NET_SUBNET_CONFLICT', first)
  assert.equal(await ipLink(second), undefined, 'nothing created on a conflict')

  const veth = `${prefix}ve`
  await sh('ip', 'link', 'add', veth, 'type', 'veth', 'peer', 'name', `${prefix}vp`)
  cleanup.push(async () => await sh('ip', 'link', 'del', veth))
  await rejectsWith(ensureBridge({ name: veth, subnet: Subnet.parseForVms(b) }), 'UIG_ERR_NET_BRIDGE_CONFLICT', 'veth device, not a bridge')
})

test('tap: named from the VM id, plugged into the bridge and up; idempotent; listed by prefix; deleted', async (t) => {
  const cleanup = new CleanupStack()
  t.after(async () => await cleanup.run())
  const prefix = testPrefix()
  const bridge = `${prefix}br`
  const [cidr = ''] = await freeSubnets(1)
  cleanup.push(async () => await deleteBridge(bridge))
  await ensureBridge({ name: bridge, subnet: Subnet.parseForVms(cidr) })

  const name = tapNameFor('vm-one', prefix)
  assert.equal(name.length, 15)
  assert.equal(name, tapNameFor('vm-one', prefix))
  assert.notEqual(name, tapNameFor('vm-two', prefix))
  assert.match(tapNameFor('0f6c1a2e-aaaa-bbbb-cccc-000000000000'), /^uig[0-9a-f]{12}$/)
  assert.throws(() => tapNameFor('x', 'much-too-long'), /tap prefix/)

  cleanup.push(async () => await deleteTap(name))
  await createTap(name, bridge)
  const link = await ipLink(name)
  assert.equal(link?.linkinfo?.info_kind, 'tun')
  assert.equal(link?.linkinfo?.info_data?.type, 'tap')
  assert.equal(link?.master, bridge)
  assert.ok(link?.flags?.includes('UP'))

  // Idempotent, and it repairs a tap that fell off the bridge.
  await sh('ip', 'link', 'set', name, 'nomaster')
  await createTap(name, bridge)
  assert.equal((await ipLink(name))?.master, bridge)

  const other = tapNameFor('vm-two', prefix)
  cleanup.push(async () => await deleteTap(other))
  await createTap(other, bridge)
  assert.deepEqual(await listTaps(prefix), [name, other].sort())
  // Not ours: a longer prefix that starts the same, and a name of the wrong length.
  for (const foreign of [`${prefix}x${'0'.repeat(15 - prefix.length - 1)}`, `${prefix}0abc`]) {
    cleanup.push(async () => await deleteTap(foreign))
    await createTap(foreign, bridge)
  }
  assert.deepEqual(await listTaps(prefix), [name, other].sort())
  assert.ok(!(await listTaps()).some((tap) => tap.startsWith(prefix)), 'the default prefix does not claim test taps')

  await deleteTap(name)
  await deleteTap(name)
  assert.equal(await ipLink(name), undefined)
  assert.deepEqual(await listTaps(prefix), [other])
})

test('without root, ip\'s refusal and HostNetwork.setup() are UIG_ERR_HOST_NOT_ROOT and say what to do', async () => {
  // A child process as nobody: the real refusal of the real kernel.
  const script = `
    const { ensureBridge } = await import(${JSON.stringify(join(packageRoot, 'dist/src/net/bridge.js'))})
    const { Subnet } = await import(${JSON.stringify(join(packageRoot, 'dist/src/net/subnet.js'))})
    const { HostNetwork } = await import(${JSON.stringify(join(packageRoot, 'dist/src/net/host-network.js'))})
    const errors = []
    try { await ensureBridge({ name: process.argv[1], subnet: Subnet.parseForVms('10.250.0.0/24') }) }
    catch (err) { errors.push({ code: err.code, message: err.message }) }
    try { await new HostNetwork({ bridge: process.argv[1], nat: true, store: {} }).setup() }
    catch (err) { errors.push({ code: err.code, message: err.message }) }
    process.stdout.write(JSON.stringify(errors))`
  const name = `${testPrefix()}nr`
  const { stdout } = await run(process.execPath, ['--input-type=module', '-e', script, name], { uid: 65534, gid: 65534 })
  const errors = JSON.parse(stdout) as Array<{ code: string, message: string }>
  assert.equal(errors.length, 2)
  for (const err of errors) {
    assert.equal(err.code, 'UIG_ERR_HOST_NOT_ROOT', err.message)
    assert.match(err.message, /as root/)
    assert.match(err.message, /network: user/)
  }
  assert.match(errors[0]?.message ?? '', /"ip link add name .* was refused \(RTNETLINK answers: Operation not permitted\)/)
  assert.equal(await ipLink(name), undefined)
})

test('tap: with a neighbour, the bridge learns the guest\'s MAC for its address at once, replacing an older one; a device of the name that is no tap is refused', async (t) => {
  const cleanup = new CleanupStack()
  t.after(async () => await cleanup.run())
  const prefix = testPrefix()
  const bridge = `${prefix}br`
  const [cidr = ''] = await freeSubnets(1)
  const subnet = Subnet.parseForVms(cidr)
  cleanup.push(async () => await deleteBridge(bridge))
  await ensureBridge({ name: bridge, subnet })
  const ip = [...subnet.hosts()][5] ?? ''
  const neighbour = async (): Promise<string> => (await sh('ip', 'neigh', 'show', 'to', ip, 'dev', bridge)).trim()

  const first = tapNameFor('vm-first', prefix)
  cleanup.push(async () => await deleteTap(first))
  await createTap(first, bridge, { ip, mac: '02:00:00:00:aa:01' })
  assert.match(await neighbour(), /lladdr 02:00:00:00:aa:01 STALE/)
  // The address goes to another VM: the host must not keep sending to the old MAC.
  const second = tapNameFor('vm-second', prefix)
  cleanup.push(async () => await deleteTap(second))
  await createTap(second, bridge, { ip, mac: '02:00:00:00:aa:02' })
  assert.match(await neighbour(), /lladdr 02:00:00:00:aa:02 STALE/)
  // Again, for a tap that exists (a re-adopted VM): the same, through the slow path.
  await createTap(second, bridge, { ip, mac: '02:00:00:00:aa:02' })
  assert.equal((await ipLink(second))?.master, bridge)

  const veth = tapNameFor('vm-veth', prefix)
  await sh('ip', 'link', 'add', veth, 'type', 'veth', 'peer', 'name', `${prefix}vp`)
  cleanup.push(async () => await sh('ip', 'link', 'del', veth))
  await rejectsWith(createTap(veth, bridge), 'UIG_ERR_NET_SETUP_FAILED', 'is not a tap')
  assert.equal((await ipLink(veth))?.master, undefined, 'the foreign device was left as it was')
  await assert.rejects(createTap(first, bridge, { ip, mac: 'not a mac' }), TypeError)
})

test('tap: deletions asked for together all happen, those of taps that are not there included', async (t) => {
  const cleanup = new CleanupStack()
  t.after(async () => await cleanup.run())
  const prefix = testPrefix()
  const bridge = `${prefix}br`
  const [cidr = ''] = await freeSubnets(1)
  cleanup.push(async () => await deleteBridge(bridge))
  await ensureBridge({ name: bridge, subnet: Subnet.parseForVms(cidr) })
  const names = Array.from({ length: 6 }, (_, i) => tapNameFor(`vm-${i}`, prefix))
  for (const name of names) {
    cleanup.push(async () => await deleteTap(name))
    await createTap(name, bridge)
  }
  await Promise.all([...names, tapNameFor('never-made', prefix), names[0] ?? ''].map(async (name) => { await deleteTap(name) }))
  assert.deepEqual(await listTaps(prefix), [])
  await assert.rejects(deleteTap('bad name'), TypeError)
})
