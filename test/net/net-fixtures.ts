import { spawn, type ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { createServer as createHttpServer, request } from 'node:http'
import { createServer, type Server } from 'node:net'
import { run } from '../../src/core/exec.js'
import type { IpLink } from '../../src/net/net-tool.js'

/**
 * Helpers for the networking tests: real namespaces, veths and listeners,
 * every one named with a per-run prefix and removed by the cleanup stack.
 * Nothing here sends a packet to an address outside this machine.
 */

/** `uigt` and 3 random hex digits: 7 bytes, short enough to be a tap prefix. */
export function testPrefix (): string {
  return `uigt${randomBytes(2).toString('hex').slice(0, 3)}`
}

/** Runs a command, returns its stdout. */
export async function sh (cmd: string, ...args: string[]): Promise<string> {
  return (await run(cmd, args)).stdout
}

export async function ipLink (name: string): Promise<IpLink | undefined> {
  try {
    return (JSON.parse(await sh('ip', '-j', '-d', 'addr', 'show', 'dev', name)) as IpLink[])[0]
  } catch {
    return undefined
  }
}

/** `count` distinct 10.250.X.0/24 networks that no interface of this host uses. */
export async function freeSubnets (count: number): Promise<string[]> {
  const used = new Set<number>()
  for (const link of JSON.parse(await sh('ip', '-j', '-4', 'addr')) as IpLink[]) {
    for (const a of link.addr_info ?? []) {
      const m = /^10\.250\.(\d+)\./.exec(a.local)
      if (m?.[1] !== undefined) used.add(Number(m[1]))
    }
  }
  const picked: number[] = []
  while (picked.length < count) {
    const octet = 1 + Math.floor(Math.random() * 250)
    if (!used.has(octet) && !picked.includes(octet)) picked.push(octet)
  }
  return picked.map((o) => `10.250.${o}.0/24`)
}

/** Undo actions run in reverse order; each failure is kept, none stops the others. */
export class CleanupStack {
  readonly #actions: Array<() => Promise<unknown>> = []

  push (action: () => Promise<unknown>): void {
    this.#actions.push(action)
  }

  async run (): Promise<void> {
    const errors: unknown[] = []
    for (const action of this.#actions.splice(0).reverse()) {
      try { await action() } catch (err) { errors.push(err) }
    }
    if (errors.length > 0) throw new AggregateError(errors, 'cleanup failed')
  }
}

/**
 * A network namespace standing in for a guest (or for the world outside the
 * host): a real network stack on one end of a veth pair whose other end is
 * on the host, plugged into `master` when given.
 */
export async function addNamespace (cleanup: CleanupStack, options: {
  name: string
  hostSide: string
  nsSide: string
  address: string
  master?: string
  hostAddress?: string
  gateway?: string
  mac?: string
}): Promise<void> {
  const { name, hostSide, nsSide } = options
  await sh('ip', 'netns', 'add', name)
  cleanup.push(async () => await sh('ip', 'netns', 'del', name))
  // Deleting the namespace deletes nsSide, and with it its peer.
  await sh('ip', 'link', 'add', hostSide, 'type', 'veth', 'peer', 'name', nsSide)
  cleanup.push(async () => await run('ip', ['link', 'del', hostSide]).catch(() => undefined))
  await sh('ip', 'link', 'set', nsSide, 'netns', name)
  if (options.master !== undefined) await sh('ip', 'link', 'set', hostSide, 'master', options.master)
  if (options.hostAddress !== undefined) await sh('ip', 'addr', 'add', options.hostAddress, 'dev', hostSide)
  await sh('ip', 'link', 'set', hostSide, 'up')
  const inNs = async (...args: string[]): Promise<string> => await sh('ip', '-n', name, ...args)
  await inNs('link', 'set', 'lo', 'up')
  if (options.mac !== undefined) await inNs('link', 'set', nsSide, 'address', options.mac)
  await inNs('addr', 'add', options.address, 'dev', nsSide)
  await inNs('link', 'set', nsSide, 'up')
  if (options.gateway !== undefined) await inNs('route', 'add', 'default', 'via', options.gateway)
}

const SERVER = `
const http = require('node:http')
const [address, port, label] = process.argv.slice(1)
http.createServer((req, res) => res.end(label + ' from ' + req.socket.remoteAddress))
  .listen(Number(port), address, () => process.stdout.write('ready\\n'))
`

/** Starts an HTTP server in namespace `ns` that answers "LABEL from CLIENT-ADDRESS". */
export async function serveInNamespace (cleanup: CleanupStack, ns: string, address: string, port: number, label: string): Promise<void> {
  const child: ChildProcess = spawn('ip', ['netns', 'exec', ns, process.execPath, '-e', SERVER, address, String(port), label], { stdio: ['ignore', 'pipe', 'pipe'] })
  cleanup.push(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve))
      child.kill()
      await exited
    }
  })
  await new Promise<void>((resolve, reject) => {
    let stderr = ''
    child.stderr?.on('data', (c: Buffer) => { stderr += c.toString() })
    child.stdout?.on('data', (c: Buffer) => { if (c.toString().includes('ready')) resolve() })
    child.once('exit', (code) => reject(new Error(`server in ${ns} exited with ${code}: ${stderr}`)))
    child.once('error', reject)
  })
}

/** An HTTP server in this process on a host address, answering "LABEL from CLIENT-ADDRESS". */
export async function serveOnHost (cleanup: CleanupStack, address: string, port: number, label: string): Promise<number> {
  const server = createHttpServer((req, res) => res.end(`${label} from ${req.socket.remoteAddress ?? '?'}`))
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, address, resolve)
  })
  cleanup.push(async () => { server.closeAllConnections(); await new Promise((resolve) => server.close(resolve)) })
  return (server.address() as { port: number }).port
}

/** A plain TCP listener on a host address, to stand for a host program holding a port. */
export async function holdPort (cleanup: CleanupStack, address: string, port: number): Promise<Server> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(port, address, resolve))
  cleanup.push(async () => await new Promise((resolve) => server.close(resolve)))
  return server
}

export type Fetched = { ok: true, body: string } | { ok: false, error: string }

/** GETs http://host:port/ from this process, without retrying. */
export async function fetchFromHost (host: string, port: number, timeoutMs = 2000): Promise<Fetched> {
  return await new Promise((resolve) => {
    const req = request({ host, port, path: '/', timeout: timeoutMs, agent: false }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { body += c })
      res.on('end', () => resolve({ ok: true, body }))
    })
    req.on('timeout', () => req.destroy(Object.assign(new Error('timeout'), { code: 'TIMEOUT' })))
    req.on('error', (err: NodeJS.ErrnoException) => resolve({ ok: false, error: err.code ?? err.message }))
    req.end()
  })
}

const CLIENT = `
const http = require('node:http')
const [host, port, ms] = process.argv.slice(1)
const req = http.get({ host, port: Number(port), path: '/', timeout: Number(ms), agent: false }, (res) => {
  let body = ''
  res.on('data', (c) => { body += c })
  res.on('end', () => process.stdout.write(JSON.stringify({ ok: true, body })))
})
req.on('timeout', () => req.destroy(Object.assign(new Error('timeout'), { code: 'TIMEOUT' })))
req.on('error', (err) => process.stdout.write(JSON.stringify({ ok: false, error: err.code || err.message })))
`

/** GETs http://host:port/ from inside namespace `ns`, as a guest would. */
export async function fetchFromNamespace (ns: string, host: string, port: number, timeoutMs = 2000): Promise<Fetched> {
  const stdout = await sh('ip', 'netns', 'exec', ns, process.execPath, '-e', CLIENT, host, String(port), String(timeoutMs))
  return JSON.parse(stdout) as Fetched
}

/**
 * Sends one hand-made TCP SYN out of `iface` in namespace `ns`, as an Ethernet
 * frame: the way a hostile guest would send what its own routing refuses
 * (e.g. to 127.0.0.1 through the bridge).
 */
export async function sendRawSyn (ns: string, frame: { iface: string, srcMac: string, dstMac: string, srcIp: string, dstIp: string, dstPort: number }): Promise<void> {
  await sh('ip', 'netns', 'exec', ns, 'python3', '-c', RAW_SYN, frame.iface, frame.srcMac, frame.dstMac, frame.srcIp, frame.dstIp, String(frame.dstPort))
}

const RAW_SYN = `
import socket, struct, sys
iface, src_mac, dst_mac, src_ip, dst_ip, dport = sys.argv[1:7]
def checksum(b):
    if len(b) % 2: b += b'\\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
sip, dip = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
tcp = struct.pack('!HHIIBBHHH', 40000, int(dport), 1, 0, 5 << 4, 0x02, 64240, 0, 0)
tcp = tcp[:16] + struct.pack('!H', checksum(sip + dip + struct.pack('!BBH', 0, 6, len(tcp)) + tcp)) + tcp[18:]
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, sip, dip)
ip = ip[:10] + struct.pack('!H', checksum(ip)) + ip[12:]
mac = lambda m: bytes.fromhex(m.replace(':', ''))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
s.send(mac(dst_mac) + mac(src_mac) + b'\\x08\\x00' + ip + tcp)
`
