import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { createServer, type AddressInfo } from 'node:net'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { createLogger } from '../../src/core/logger.js'
import { CLUSTER_ROUTE_PROTO, ClusterRoutes, type RoutePeer } from '../../src/net/cluster-routes.js'
import { startClusterLab, type ClusterLab, type FakeGuest, type LabProcess } from '../helpers/cluster-lab.js'
import { packageRoot } from '../helpers/fixtures.js'
import { rejectsWith } from '../helpers/assertions.js'
import { fetchFromHost, fetchFromNamespace, type Fetched } from './net-fixtures.js'

/**
 * Two nodes of a cluster lab, each with the bridge network a daemon sets up
 * (HostNetwork with a cluster range: node 1 with NAT, node 2 without) and
 * routes to the other's VM subnet (ClusterRoutes); a fake-guest namespace on
 * each node's bridge stands in for a VM. No VMs, no daemon, no etcd.
 */

const HELPER = join(packageRoot, 'dist/test/helpers/cluster-node-net.js')
const GUEST_PORT = 8000
const API_PORT = 7377
const GATEWAY_PORT = 7380
const DROP_WAIT_MS = 700

const answered = (fetched: Fetched): string => {
  assert.ok(fetched.ok, `expected an answer, got ${fetched.ok ? '' : fetched.error}`)
  return fetched.body
}

const notAnswered = (fetched: Fetched): void => {
  assert.ok(!fetched.ok, `expected no answer, got "${fetched.ok ? fetched.body : ''}"`)
}

/** A plain HTTP server in a guest namespace that says who called it. */
const SERVER = `
const http = require('node:http')
const [address, port, label] = process.argv.slice(1)
http.createServer((req, res) => res.end(label + ' from ' + req.socket.remoteAddress))
  .listen(Number(port), address, () => process.stdout.write('ready\\n'))
`

/** The raw TCP listeners of the helper answer without HTTP: read what they send. */
const TCP_CLIENT = `
const net = require('node:net')
const [host, port, ms] = process.argv.slice(1)
const s = net.connect({ host, port: Number(port) })
let body = ''
s.setTimeout(Number(ms), () => { process.stdout.write(JSON.stringify({ ok: false, error: 'TIMEOUT' })); s.destroy() })
s.on('data', (c) => { body += c })
s.on('end', () => process.stdout.write(JSON.stringify({ ok: true, body })))
s.on('error', (err) => process.stdout.write(JSON.stringify({ ok: false, error: err.code || err.message })))
`

async function tcpFromGuest (guest: FakeGuest, host: string, port: number, timeoutMs = 2000): Promise<Fetched> {
  return JSON.parse((await guest.exec(process.execPath, ['-e', TCP_CLIENT, host, String(port), String(timeoutMs)])).stdout) as Fetched
}

async function waitForLine (child: LabProcess, line: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    const log = await readFile(child.logPath, 'utf8').catch(() => '')
    if (log.split('\n').includes(line)) return
    if (child.exitCode !== null) throw new Error(`${child.spawnargs.join(' ')} exited with ${child.exitCode}:\n${log.slice(-2000)}`)
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  throw new Error(`no "${line}" in ${child.logPath} after ${timeoutMs} ms`)
}

async function ourRoutes (lab: ClusterLab, i: number): Promise<string> {
  return (await lab.exec(i, 'ip', ['-4', 'route', 'show', 'proto', String(CLUSTER_ROUTE_PROTO)])).stdout.trim()
}

describe('cluster network: routes between node subnets, the firewall with a cluster range', { timeout: 120_000 }, () => {
  let lab: ClusterLab
  let guestA: FakeGuest
  let guestB: FakeGuest
  const peerOf = (i: number): RoutePeer => ({ node: lab.node(i).name, subnet: lab.node(i).subnet, via: lab.node(i).underlay })
  const gatewayOf = (i: number): string => lab.node(i).subnet.replace(/\.0\/24$/, '.1')
  const guestAddress = (i: number): string => lab.node(i).subnet.replace(/\.0\/24$/, '.10')

  before(async () => {
    lab = await startClusterLab({ nodes: 2, etcdMembers: 0, name: 'uigroutes' })
    for (const i of [1, 2]) {
      const node = lab.node(i)
      const helper = lab.spawn(i, process.execPath, [HELPER, JSON.stringify({
        mode: 'host',
        bridge: 'uigniter0',
        subnet: node.subnet,
        clusterRange: lab.clusterRange,
        // Both ways of the bridge network: masquerade on (the default) and off.
        nat: i === 1,
        allowedHostPorts: [GATEWAY_PORT],
        peers: [peerOf(3 - i)],
        listen: [{ address: node.underlay, port: API_PORT }, { address: node.underlay, port: GATEWAY_PORT }]
      })], { log: `net-${node.name}.log` })
      await waitForLine(helper, 'ready')
    }
    guestA = await lab.addFakeGuest(1, { bridge: 'uigniter0', address: `${guestAddress(1)}/24`, gateway: gatewayOf(1) })
    guestB = await lab.addFakeGuest(2, { bridge: 'uigniter0', address: `${guestAddress(2)}/24`, gateway: gatewayOf(2) })
    for (const [guest, label] of [[guestA, 'A'], [guestB, 'B']] as const) {
      await waitForLine(guest.spawn(process.execPath, ['-e', SERVER, guest.address, String(GUEST_PORT), label], { log: `guest-${label}.log` }), 'ready')
    }
  })

  after(async () => { await lab?.close() })

  test('each node routes the other\'s subnet via its underlay address, with proto 177', async () => {
    assert.equal(await ourRoutes(lab, 1), `${lab.node(2).subnet} via ${lab.node(2).underlay} dev eth0`)
    assert.equal(await ourRoutes(lab, 2), `${lab.node(1).subnet} via ${lab.node(1).underlay} dev eth0`)
    const path = (await lab.exec(1, 'ip', ['route', 'get', guestB.address])).stdout
    assert.match(path, new RegExp(`via ${lab.node(2).underlay.replaceAll('.', '\\.')} dev eth0`))
  })

  test('a guest reaches a guest on the other node by its address, which sees the caller\'s own address (no masquerade), both ways', async () => {
    assert.equal(answered(await fetchFromNamespace(guestA.ns, guestB.address, GUEST_PORT)), `B from ${guestA.address}`)
    assert.equal(answered(await fetchFromNamespace(guestB.ns, guestA.address, GUEST_PORT)), `A from ${guestB.address}`)
  })

  test('a client on the underlay (the root netns) reaches each node\'s guests directly', async () => {
    assert.equal(answered(await fetchFromHost(guestB.address, GUEST_PORT)), `B from ${lab.hostAddress}`)
    assert.equal(answered(await fetchFromHost(guestA.address, GUEST_PORT)), `A from ${lab.hostAddress}`)
  })

  test('a guest of another node reaches only the allowed host ports of a node, as its local guests do', async () => {
    const b = lab.node(2)
    const a = lab.node(1)
    assert.equal(answered(await tcpFromGuest(guestA, b.underlay, GATEWAY_PORT)), `host ${b.underlay}:${GATEWAY_PORT} from ${guestA.address}`)
    notAnswered(await tcpFromGuest(guestA, b.underlay, API_PORT, DROP_WAIT_MS))
    // The other node's own VM network address is one of its host addresses too.
    notAnswered(await tcpFromGuest(guestA, gatewayOf(2), API_PORT, DROP_WAIT_MS))
    // The node's local guest: the same rules (the allowed ports on the gateway address only).
    notAnswered(await tcpFromGuest(guestB, b.underlay, API_PORT, DROP_WAIT_MS))
    // And in the other direction, through the node with NAT.
    notAnswered(await tcpFromGuest(guestB, a.underlay, API_PORT, DROP_WAIT_MS))
    assert.equal(answered(await tcpFromGuest(guestB, a.underlay, GATEWAY_PORT)), `host ${a.underlay}:${GATEWAY_PORT} from ${guestB.address}`)
    // Not a guard against everyone: another host on the underlay (node 1 itself, not its guest) reaches the API.
    const fromRoot = JSON.parse((await lab.exec(1, process.execPath, ['-e', TCP_CLIENT, b.underlay, String(API_PORT), '2000'])).stdout) as Fetched
    assert.equal(answered(fromRoot), `host ${b.underlay}:${API_PORT} from ${a.underlay}`)
  })

  test('traffic that leaves the cluster is as before: masqueraded on the node with NAT, dropped on the one without', async (t) => {
    const server = createServer((socket) => socket.end(`outside from ${socket.remoteAddress ?? '?'}`))
    await new Promise<void>((resolve) => server.listen(0, lab.hostAddress, resolve))
    t.after(() => server.close())
    const port = (server.address() as AddressInfo).port
    assert.equal(answered(await tcpFromGuest(guestA, lab.hostAddress, port)), `outside from ${lab.node(1).underlay}`)
    notAnswered(await tcpFromGuest(guestB, lab.hostAddress, port, DROP_WAIT_MS))
  })

  test('a peer subnet overlapping our own is refused before anything is touched', async () => {
    const routes = new ClusterRoutes({ ownSubnet: lab.node(1).subnet, logger: createLogger('silent') })
    const inside = lab.node(1).subnet.replace(/\.0\/24$/, '.128/25')
    await rejectsWith(routes.sync([{ node: 'n9', subnet: inside, via: '192.0.2.9' }]), 'UIG_ERR_NET_SETUP_FAILED', 'overlaps', lab.node(1).subnet)
    await rejectsWith(routes.sync([peerOf(2), { ...peerOf(2), node: 'n9' }]), 'UIG_ERR_NET_SETUP_FAILED', 'overlapping')
  })

  test('routes are ours after a restart: a fresh process changes nothing when all is in place, and removes them with sync([])', async () => {
    const sync = async (peers: RoutePeer[]): Promise<{ result: { ok: boolean, code?: string, message?: string }, log: string }> => {
      const { stdout, stderr } = await lab.exec(1, process.execPath, [HELPER, JSON.stringify({ mode: 'routes', subnet: lab.node(1).subnet, peers })])
      return { result: JSON.parse(stdout) as { ok: boolean }, log: stderr }
    }
    // Not ours: a route without proto 177 stays whatever the peers.
    const foreign = lab.clusterRange.replace(/\.0\.0\/16$/, '.99.0/24')
    await lab.exec(1, 'ip', ['route', 'add', foreign, 'via', lab.node(2).underlay])

    const again = await sync([peerOf(2)])
    assert.ok(again.result.ok)
    assert.doesNotMatch(again.log, /cluster routes updated/, 'nothing changed: no ip batch')

    const unreachable = await sync([{ ...peerOf(2), via: '172.31.255.1' }])
    assert.equal(unreachable.result.code, 'UIG_ERR_NET_SETUP_FAILED')
    assert.match(unreachable.result.message ?? '', /on a link this node shares/)

    const moved = await sync([{ ...peerOf(2), via: lab.hostAddress }])
    assert.ok(moved.result.ok)
    assert.equal(await ourRoutes(lab, 1), `${lab.node(2).subnet} via ${lab.hostAddress} dev eth0`)

    const emptied = await sync([])
    assert.ok(emptied.result.ok)
    assert.equal(await ourRoutes(lab, 1), '')
    assert.match((await lab.exec(1, 'ip', ['-4', 'route', 'show', foreign])).stdout, new RegExp(`via ${lab.node(2).underlay.replaceAll('.', '\\.')}`))
  })
})
