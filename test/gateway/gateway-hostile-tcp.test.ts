import assert from 'node:assert/strict'
import { once } from 'node:events'
import { connect, createServer, type Socket } from 'node:net'
import { test } from 'node:test'
import fc from 'fast-check'
import { freePort } from '../../src/core/free-port.js'
import { routeFor, startGateway, startTcpUpstreams, until } from './gateway-fixtures.js'

/** What a hostile TCP upstream does, step by step, once it has read the client's first line (`case N`). */
type Step =
  | { op: 'write', bytes: Buffer }
  | { op: 'echo' }
  | { op: 'pause' }
  | { op: 'wait', ms: number }

interface TcpCase {
  steps: Step[]
  /** How it ends: FIN (after the client's FIN when it echoes), RST, or a plain destroy. */
  end: 'end' | 'reset' | 'destroy'
  /** What the client sends after its first line, before its FIN; or it resets its own connection after `resetAfterMs`. */
  payload: Buffer
  clientReset: boolean
}

const step: fc.Arbitrary<Step> = fc.oneof(
  { weight: 4, arbitrary: fc.uint8Array({ maxLength: 20_000 }).map((a) => ({ op: 'write' as const, bytes: Buffer.from(a) })) },
  { weight: 1, arbitrary: fc.constant({ op: 'write' as const, bytes: Buffer.alloc(1024 * 1024, 7) }) },
  { weight: 1, arbitrary: fc.constant({ op: 'echo' as const }) },
  { weight: 1, arbitrary: fc.constant({ op: 'pause' as const }) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 5 }).map((ms) => ({ op: 'wait' as const, ms })) }
)

const tcpCase: fc.Arbitrary<TcpCase> = fc.record({
  steps: fc.array(step, { maxLength: 4 }),
  end: fc.constantFrom<TcpCase['end']>('end', 'reset', 'destroy'),
  payload: fc.uint8Array({ maxLength: 5000 }).map((a) => Buffer.from(a)),
  clientReset: fc.boolean().map((b) => b && Math.random() < 0.2)
})

/** The upstream plays the case its client names on the first line; it records what it wrote (and echoed). */
function hostileServer (cases: Map<string, TcpCase>, written: Map<string, Buffer[]>): ReturnType<typeof createServer> {
  return createServer({ allowHalfOpen: true }, (socket) => {
    socket.on('error', () => socket.destroy())
    let head = Buffer.alloc(0)
    const onFirst = (chunk: Buffer): void => {
      head = Buffer.concat([head, chunk])
      const nl = head.indexOf('\n')
      if (nl < 0) return
      socket.off('data', onFirst)
      socket.pause()
      const id = head.toString('latin1', 5, nl)
      const rest = head.subarray(nl + 1)
      const c = cases.get(id)
      if (c === undefined) {
        socket.destroy()
        return
      }
      void play(socket, id, c, rest, written)
    }
    socket.on('data', onFirst)
  })
}

async function play (socket: Socket, id: string, c: TcpCase, rest: Buffer, written: Map<string, Buffer[]>): Promise<void> {
  const out: Buffer[] = []
  written.set(id, out)
  let echoing = false
  let paused = false
  const clientEnded = new Promise<void>((resolve) => socket.once('end', resolve))
  for (const s of c.steps) {
    if (socket.destroyed) return
    if (s.op === 'write') {
      out.push(s.bytes)
      socket.write(s.bytes)
    } else if (s.op === 'echo' && !echoing) {
      echoing = true
      if (rest.length > 0) {
        out.push(rest)
        socket.write(rest)
      }
      socket.on('data', (d: Buffer) => { out.push(d); socket.write(d) })
      if (!paused) socket.resume()
    } else if (s.op === 'pause') {
      paused = true
      socket.pause()
    } else if (s.op === 'wait') {
      await new Promise((resolve) => setTimeout(resolve, s.ms))
    }
  }
  if (socket.destroyed) return
  if (c.end === 'end') {
    // A clean end: everything written reaches the client. Echoing, it first takes the client's FIN (what it echoes is then complete).
    if (echoing && !paused) await clientEnded
    socket.end()
    // Reading on (to take the client's FIN) echoes no more: what it echoed is what it wrote.
    socket.removeAllListeners('data')
    socket.resume()
  } else if (c.end === 'reset') {
    socket.resetAndDestroy()
  } else {
    socket.destroy()
  }
}

interface Got { data: Buffer, error: string | undefined, ended: boolean }

async function client (port: number, id: string, c: TcpCase, timeoutMs = 20_000): Promise<Got> {
  return await new Promise((resolve) => {
    const chunks: Buffer[] = []
    let error: string | undefined
    let ended = false
    const socket = connect({ host: '127.0.0.1', port, allowHalfOpen: true })
    const timer = setTimeout(() => { error = 'hung'; socket.destroy() }, timeoutMs)
    socket.on('data', (d: Buffer) => chunks.push(d))
    socket.on('end', () => { ended = true; socket.end() })
    socket.on('error', (err: NodeJS.ErrnoException) => { error ??= err.code ?? err.message })
    socket.on('close', () => {
      clearTimeout(timer)
      resolve({ data: Buffer.concat(chunks), error, ended })
    })
    socket.write(`case ${id}\n`)
    if (c.clientReset) {
      setTimeout(() => socket.resetAndDestroy(), 1)
      return
    }
    socket.end(c.payload)
  })
}

test('a hostile TCP upstream: generated writes, floods, echoes, stalls, FINs and resets; each client gets a prefix of what was sent (all of it on a clean end) and a close; the proxy keeps serving', { timeout: 180_000 }, async (t) => {
  const cases = new Map<string, TcpCase>()
  const written = new Map<string, Buffer[]>()
  const server = hostileServer(cases, written)
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.after(() => { server.close() })
  const address = server.address()
  assert.ok(address !== null && typeof address === 'object')
  const { port: echoPort, upstreams } = await startTcpUpstreams(t, 1)

  const { gateway } = await startGateway(t)
  const [hostilePort, healthyPort] = [await freePort(), await freePort()]
  await gateway.configure(routeFor('hostile', undefined, 'round-robin', { tcp: [{ gatewayPort: hostilePort, port: address.port }] }))
  gateway.setEndpoints('hostile', [{ id: 'hostile-0', host: '127.0.0.1', weight: 1, priority: 0 }])
  await gateway.configure(routeFor('echo', undefined, 'round-robin', { tcp: [{ gatewayPort: healthyPort, port: echoPort }] }))
  gateway.setEndpoints('echo', [{ id: 'echo-0', host: upstreams[0]!.host, weight: 1, priority: 0 }])

  const healthy = async (): Promise<void> => {
    const got = await client(healthyPort, 'x', { steps: [], end: 'end', payload: Buffer.from('ping'), clientReset: false })
    assert.equal(got.error, undefined)
    assert.equal(got.data.toString(), 'u0:case x\nping')
  }

  let next = 0
  let connections = 0
  let clean = 0
  await fc.assert(fc.asyncProperty(fc.array(tcpCase, { minLength: 20, maxLength: 20 }), async (batch: TcpCase[]) => {
    const ids = batch.map((c) => {
      const id = String(next++)
      cases.set(id, c)
      return id
    })
    const side = Promise.all([healthy(), healthy()])
    const got = await Promise.all(ids.map(async (id, i) => await client(hostilePort, id, batch[i]!)))
    connections += ids.length
    ids.forEach((id, i) => {
      const c = batch[i]!
      const g = got[i]!
      const what = `case ${JSON.stringify({ steps: c.steps.map((s) => s.op === 'write' ? `write ${s.bytes.length}` : s.op), end: c.end, payload: c.payload.length, clientReset: c.clientReset })}: got ${g.data.length} bytes, error ${g.error}, ended ${g.ended}`
      assert.notEqual(g.error, 'hung', what)
      if (c.clientReset) return
      const sent = Buffer.concat(written.get(id) ?? [])
      assert.ok(sent.subarray(0, g.data.length).equals(g.data), `not a prefix of what the upstream sent: ${what}`)
      if (c.end === 'end') {
        clean++
        assert.equal(g.data.length, sent.length, `a clean end lost bytes: ${what}`)
        assert.equal(g.ended, true, what)
      }
      cases.delete(id)
      written.delete(id)
    })
    await side
  }), { numRuns: 100 })
  t.diagnostic(`${connections} generated connections, ${clean} of them ended cleanly by the upstream`)

  await until('no TCP connection left open to the hostile upstream', () => gateway.load('hostile').inFlight === 0, 10_000)
  await healthy()
  const again = await client(hostilePort, 'last', { steps: [], end: 'end', payload: Buffer.alloc(0), clientReset: false }).catch(() => undefined)
  assert.notEqual(again?.error, 'hung')
})
