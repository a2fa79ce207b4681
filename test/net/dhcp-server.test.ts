import assert from 'node:assert/strict'
import { holdDhcpPort } from '../helpers/dhcp-port-holder.js'
import { access, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import { run } from '../../src/core/exec.js'
import { DHCP_STATE_ROOT, DhcpServer } from '../../src/net/dhcp-server.js'
import { HostNetwork } from '../../src/net/host-network.js'
import { macForVm } from '../../src/core/mac-address.js'
import { Subnet } from '../../src/net/subnet.js'
import { rejectsWith } from '../helpers/assertions.js'
import { InMemoryIpAllocationStore } from './in-memory-ip-allocation-store.js'
import { CleanupStack, addNamespace, freeSubnets, sh, testPrefix } from './net-fixtures.js'

/**
 * The bridge's DHCP server: a real dnsmasq behind HostNetwork's firewall,
 * and network namespaces on the bridge as guests running busybox's udhcpc,
 * a real DHCP client. Nothing leaves this machine.
 */

const NAMESERVER = '10.255.255.53'

/** A udhcpc script that prints what it was given, as `key=value` lines. */
const SCRIPT = '#!/bin/sh\nif [ "$1" = bound ]; then echo "ip=$ip"; echo "mask=$subnet"; echo "router=$router"; echo "dns=$dns"; echo "lease=$lease"; fi\n'

const noNameservers = async (): Promise<string[]> => await Promise.resolve([])

interface Lease { ip?: string, mask?: string, router?: string, dns?: string, lease?: string }

describe('the DHCP server on the bridge (dnsmasq)', { timeout: 180_000 }, () => {
  const cleanup = new CleanupStack()
  const prefix = testPrefix()
  const bridge = `${prefix}br`
  const store = new InMemoryIpAllocationStore()
  let subnet: Subnet
  let network: HostNetwork
  let dhcp: DhcpServer
  let dir: string
  let script: string
  let namespaces = 0

  /** A namespace on the bridge with this MAC, standing for a guest that has no address yet. */
  async function guest (mac: string): Promise<{ ns: string, iface: string }> {
    const n = namespaces++
    const ns = `${prefix}-g${n}`
    const iface = `${prefix}g${n}`
    // An address outside the subnet: the client must get its own from DHCP.
    await addNamespace(cleanup, { name: ns, hostSide: `${prefix}h${n}`, nsSide: iface, master: bridge, address: `169.254.77.${n + 1}/32`, mac })
    return { ns, iface }
  }

  /** Runs udhcpc once in the namespace; undefined when no server answered. */
  async function askDhcp (g: { ns: string, iface: string }, tries = 4): Promise<Lease | undefined> {
    const result = await run('ip', ['netns', 'exec', g.ns, 'busybox', 'udhcpc', '-i', g.iface, '-f', '-q', '-n', '-t', String(tries), '-T', '1', '-s', script])
      .catch((err: unknown) => ({ stdout: '', failed: err }))
    if ('failed' in result) return undefined
    return Object.fromEntries(result.stdout.trim().split('\n').map((l) => l.split('=', 2))) as Lease
  }

  before(async () => {
    const [cidr = ''] = await freeSubnets(1)
    subnet = Subnet.parseForVms(cidr)
    dir = await mkdtemp(join(tmpdir(), `${prefix}-`))
    cleanup.push(async () => await rm(dir, { recursive: true, force: true }))
    script = join(dir, 'udhcpc.sh')
    await writeFile(script, SCRIPT, { mode: 0o755 })
    const resolvConf = join(dir, 'resolv.conf')
    await writeFile(resolvConf, `nameserver 127.0.0.53\nnameserver ${NAMESERVER}\n`)
    network = new HostNetwork({ bridge, subnet: subnet.cidr, nat: false, store, tapPrefix: prefix, firewallTable: prefix, resolvConf })
    cleanup.push(async () => await network.teardown())
    await network.setup()
    dhcp = new DhcpServer({ bridge, subnet, nameservers: async () => await network.nameservers(), stateDir: join(DHCP_STATE_ROOT, bridge), backoff: { initialMs: 200, maxMs: 1000 } })
    cleanup.push(async () => await dhcp.close())
    await network.useDhcp(dhcp)
    await dhcp.start()
  })

  after(async () => await cleanup.run())

  test('the state directory must be world-searchable: dnsmasq reads its table as nobody', async () => {
    // A 0700 temp dir, as a data dir may be: the failure says so instead of serving nobody.
    const hidden = new DhcpServer({ bridge, subnet, nameservers: noNameservers, stateDir: join(dir, 'dhcp') })
    cleanup.push(async () => await hidden.close())
    await rejectsWith(hidden.start(), 'UIG_ERR_NET_DHCP_FAILED', 'cannot read its hosts file', 'Permission denied')
  })

  test('an attached VM\'s MAC gets its address, the gateway and the nameserver; a stranger gets nothing', async () => {
    const vm = await network.attach(`${prefix}-a`)
    assert.match(await readFile(dhcp.hostsFile, 'utf8'), new RegExp(`^${vm.mac},${vm.ip.replaceAll('.', '\\.')},infinite$`, 'm'))
    const lease = await askDhcp(await guest(vm.mac))
    assert.deepEqual(lease, { ip: vm.ip, mask: subnet.netmask, router: subnet.gateway, dns: NAMESERVER, lease: '4294967295' })
    assert.equal(vm.gateway, subnet.gateway)
    assert.deepEqual(vm.dns, [NAMESERVER])

    // Static leases only: a MAC uigniter did not attach is not answered.
    assert.equal(await askDhcp(await guest(macForVm(`${prefix}-stranger`)), 2), undefined)
  })

  test('a detached VM\'s MAC is forgotten at once (the table is re-read on SIGHUP)', async () => {
    const id = `${prefix}-b`
    const vm = await network.attach(id)
    const g = await guest(vm.mac)
    assert.equal((await askDhcp(g))?.ip, vm.ip)
    await network.detach(id)
    assert.doesNotMatch(await readFile(dhcp.hostsFile, 'utf8'), new RegExp(vm.mac))
    assert.equal(await askDhcp(g, 2), undefined)
  })

  test('an address freed by one VM and given to the next goes to the new MAC, though the old one holds a lease', async () => {
    const first = await network.attach(`${prefix}-d1`)
    assert.equal((await askDhcp(await guest(first.mac)))?.ip, first.ip)
    await network.detach(`${prefix}-d1`)
    // The lowest free address again: the one the first VM's lease (infinite) still names in dnsmasq's memory.
    const next = await network.attach(`${prefix}-d2`)
    assert.equal(next.ip, first.ip)
    assert.equal((await askDhcp(await guest(next.mac)))?.ip, next.ip)
  })

  test('a dnsmasq that dies is restarted with a backoff, and answers again', async () => {
    const first = dhcp.status()
    assert.equal(first.state, 'running')
    assert.ok(first.pid !== null)
    process.kill(first.pid, 'SIGKILL')
    const deadline = Date.now() + 15_000
    while (!(dhcp.status().state === 'running' && dhcp.status().pid !== first.pid) && Date.now() < deadline) await sleep(50)
    const second = dhcp.status()
    assert.equal(second.state, 'running', JSON.stringify(second))
    assert.equal(second.restarts, first.restarts + 1)
    const vm = await network.attach(`${prefix}-c`)
    assert.equal((await askDhcp(await guest(vm.mac)))?.ip, vm.ip)
  })

  test('port 67 taken on the bridge: a coded error, retries, and service once it is free', async () => {
    // A socket bound to this bridge alone (SO_BINDTODEVICE), without SO_REUSEADDR: the servers of other
    // bridges are not disturbed, but a second server on this one cannot bind.
    const other = `${prefix}x`
    await sh('ip', 'link', 'add', other, 'type', 'bridge')
    cleanup.push(async () => await run('ip', ['link', 'del', other]).catch(() => undefined))
    const otherSubnet = Subnet.parseForVms((await freeSubnets(1))[0] ?? '')
    await sh('ip', 'addr', 'add', otherSubnet.gatewayCidr, 'dev', other)
    await sh('ip', 'link', 'set', other, 'up')
    const holder = await holdDhcpPort(other)
    cleanup.push(holder.release)
    const blocked = new DhcpServer({ bridge: other, subnet: otherSubnet, nameservers: noNameservers, stateDir: join(DHCP_STATE_ROOT, other), backoff: { initialMs: 300, maxMs: 300 } })
    cleanup.push(async () => await blocked.close())
    await rejectsWith(blocked.start(), 'UIG_ERR_NET_DHCP_FAILED', `bridge ${other}`, 'Address already in use', 'UDP port 67', 'kernel command line are not affected')
    assert.equal(blocked.status().state, 'waiting')
    await sleep(700)
    assert.ok(blocked.status().restarts >= 1, 'it keeps retrying')
    // Our first server is unaffected.
    assert.equal(dhcp.status().state, 'running')

    await holder.release()
    const deadline = Date.now() + 10_000
    while (blocked.status().state !== 'running' && Date.now() < deadline) await sleep(50)
    assert.equal(blocked.status().state, 'running', JSON.stringify(blocked.status()))
    assert.equal(blocked.status().lastError, null)
  })

  test('a server left by a crashed daemon is ended by the next; close leaves no process and no file', async () => {
    const stateDir = join(DHCP_STATE_ROOT, `${prefix}-crash`)
    const crashed = new DhcpServer({ bridge, subnet, nameservers: noNameservers, stateDir, backoff: { initialMs: 60_000, maxMs: 60_000 } })
    await crashed.start()
    const leftover = crashed.status().pid ?? 0
    assert.ok(leftover > 0)
    // The next daemon's server, with the same state directory: it ends the leftover before it starts.
    const next = new DhcpServer({ bridge, subnet, nameservers: noNameservers, stateDir })
    await next.start()
    assert.ok(!alive(leftover), 'the leftover dnsmasq was ended')
    await crashed.close()
    const pid = next.status().pid ?? 0
    await next.close()
    assert.ok(!alive(pid))
    await assert.rejects(access(stateDir), { code: 'ENOENT' })
    assert.equal(next.status().state, 'stopped')
  })

  test('dnsmasq not installed: a coded error naming the package, and no retries', async () => {
    const missing = new DhcpServer({ bridge, subnet, nameservers: noNameservers, stateDir: join(DHCP_STATE_ROOT, `${prefix}-missing`), command: ['/nonexistent/dnsmasq'] })
    cleanup.push(async () => await missing.close())
    await rejectsWith(missing.start(), 'UIG_ERR_NET_DHCP_FAILED', 'dnsmasq-base')
    assert.equal(missing.status().state, 'failed')
  })
})

function alive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

