import assert from 'node:assert/strict'
import { once } from 'node:events'
import { createServer, type Server, type Socket } from 'node:net'
import { join } from 'node:path'
import { test, type TestContext } from 'node:test'
import fc from 'fast-check'
import { UigniterError } from '../../src/core/errors.js'
import { ControlChannel, MAX_CONTROL_LINE, type ControlEvent } from '../../src/vmm/qemu/control-channel.js'
import { tempDir } from '../helpers/assertions.js'
import { writeInPieces } from '../helpers/split-write.js'

/**
 * A guest init that says what its script says: for each command line the
 * host sends, the next script's bytes, in pieces a turn of the event loop
 * apart. Lines that take a reply's place (a reply, or something malformed)
 * are at most one per script, so that each command's outcome is known.
 */
interface Item {
  /** What it is to the host: a reply slot (with the outcome it gives) or a line that is no reply. */
  slot?: 'ok' | 'refused' | 'malformed'
  event?: boolean
  text: string
}

const noNewline = (s: string): string => s.replace(/[\n]/g, ' ')

const skipped: fc.Arbitrary<Item> = fc.oneof(
  // The tail of a torn line: anything but a '{' first (NULs and all).
  fc.fullUnicodeString({ maxLength: 200 }).map((s) => ({ text: `${/^\s*\{/.test(s) ? 'x' : ''}${noNewline(s)}\n` })),
  fc.constantFrom('null', '42', '[1,2]', '"str"', 'true', '\x00\x00{"ok":true}', '', '   ', '\r').map((s) => ({ text: `${s}\n` })),
  fc.record({ code: fc.integer(), extra: fc.fullUnicodeString({ maxLength: 30 }) }).map(({ code, extra }) => ({ event: true, text: `${JSON.stringify({ event: 'app-exit', code, extra })}\n` }))
)

const slot: fc.Arbitrary<Item> = fc.oneof(
  { weight: 3, arbitrary: fc.constant<Item>({ slot: 'ok', text: '{"ok":true,"n":N}\n' }) },
  { weight: 1, arbitrary: fc.fullUnicodeString({ maxLength: 40 }).map((e): Item => ({ slot: 'refused', text: `${JSON.stringify({ ok: false, error: e })}\n` })) },
  // Starts like a message and is not one: invalid JSON (a raw NUL is never valid), or an object that is no reply.
  { weight: 1, arbitrary: fc.string({ maxLength: 100 }).map((s): Item => ({ slot: 'malformed', text: `{${noNewline(s)}\x00}\n` })) },
  { weight: 1, arbitrary: fc.constantFrom('{}', '{"ok":"yes"}', '{"ok":1}', '{"event":5}', '{"hello":"guest"}').map((s): Item => ({ slot: 'malformed', text: `${s}\n` })) },
  { weight: 1, arbitrary: fc.integer({ min: MAX_CONTROL_LINE + 1, max: 3 * MAX_CONTROL_LINE }).map((n): Item => ({ slot: 'malformed', text: `{"ok":true,"pad":"${'p'.repeat(n)}"}\n` })) }
)

interface Script { before: Item[], slot: Item | null, after: Item[], cuts: number[] }

const script: fc.Arbitrary<Script> = fc.record({
  before: fc.array(skipped, { maxLength: 3 }),
  slot: fc.option(slot, { freq: 30 }),
  after: fc.array(skipped, { maxLength: 2 }),
  cuts: fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 3 })
})

async function fakeGuest (t: TestContext, scripts: Script[], counter: { n: number }): Promise<{ path: string, server: Server }> {
  const path = join(await tempDir(t), 'ctl.sock')
  const server = createServer((socket: Socket) => {
    socket.on('error', () => socket.destroy())
    let buffered = ''
    socket.setEncoding('utf8')
    socket.on('data', (text: string) => {
      buffered += text
      let nl: number
      while ((nl = buffered.indexOf('\n')) >= 0) {
        buffered = buffered.slice(nl + 1)
        const s = scripts.shift()
        const n = counter.n++
        if (s !== undefined) void play(socket, s, n)
        else socket.write(`{"ok":true,"n":${n}}\n`)
      }
    })
  })
  server.listen(path)
  await once(server, 'listening')
  t.after(() => { server.close() })
  return { path, server }
}

async function play (socket: Socket, s: Script, n: number): Promise<void> {
  const bytes = Buffer.from([...s.before, ...(s.slot === null ? [] : [s.slot]), ...s.after].map((i) => i.text.replace('"n":N', `"n":${n}`)).join(''))
  await writeInPieces(socket, bytes, s.cuts)
}

test('control channel: generated guest output (torn lines, NULs, non-objects, malformed and overlong replies, refusals, event floods, any split) fails only its own request, with a code; nothing throws', { timeout: 120_000 }, async (t) => {
  const scripts: Script[] = []
  const counter = { n: 0 }
  const { path } = await fakeGuest(t, scripts, counter)
  const channel = await ControlChannel.connect(path, 2000)
  t.after(() => channel.close())
  let events = 0
  channel.on('event', (e: ControlEvent) => {
    assert.equal(typeof e.event, 'string')
    events++
  })
  let expectedEvents = 0
  let requests = 0
  const outcomes = { ok: 0, refused: 0, malformed: 0, timeout: 0 }
  await fc.assert(fc.asyncProperty(fc.array(script, { minLength: 25, maxLength: 25 }), async (batch: Script[]) => {
    for (const s of batch) {
      expectedEvents += [...s.before, ...s.after].filter((i) => i.event === true).length
      scripts.push(s)
      const n = counter.n
      const reply = channel.request('ping', {}, 150)
      requests++
      const kind = s.slot?.slot
      if (kind === 'ok') {
        const r = await reply
        assert.equal(r.n, n, 'each reply goes to its own request')
        outcomes.ok++
        continue
      }
      await assert.rejects(reply, (err: unknown) => {
        assert.ok(err instanceof UigniterError)
        assert.equal(err.code, 'UIG_ERR_CONTROL_CHANNEL')
        if (kind === undefined) assert.match(err.message, /did not answer "ping" within/)
        else if (kind === 'refused') assert.match(err.message, /refused "ping"/)
        else assert.match(err.message, /answered "ping" with/)
        return true
      })
      outcomes[kind ?? 'timeout']++
    }
  }), { numRuns: 80 })
  t.diagnostic(`${requests} requests: ${JSON.stringify(outcomes)}; ${expectedEvents} events`)
  const deadline = Date.now() + 5000
  while (events < expectedEvents && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10))
  assert.equal(events, expectedEvents, 'every event line, and only those, came out as an event')
  // Still in step after all of it.
  const n = counter.n
  assert.equal((await channel.request('ping', {}, 2000)).n, n)
})

test('control channel: a guest flood with no newline is dropped as it comes, fails the request it stood for, and the channel goes on', { timeout: 60_000 }, async (t) => {
  const path = join(await tempDir(t), 'ctl.sock')
  let conn: Socket | undefined
  const server = createServer((socket) => { conn = socket; socket.on('error', () => socket.destroy()) })
  server.listen(path)
  await once(server, 'listening')
  t.after(() => { server.close() })
  const channel = await ControlChannel.connect(path, 2000)
  t.after(() => channel.close())
  while (conn === undefined) await new Promise((resolve) => setTimeout(resolve, 5))
  const first = channel.request('status', {}, 10_000)
  const heapBefore = process.memoryUsage().heapUsed
  const mb = Buffer.alloc(1024 * 1024, 'y')
  for (let i = 0; i < 64; i++) {
    if (!conn.write(mb)) await once(conn, 'drain')
  }
  const heapGrowth = process.memoryUsage().heapUsed - heapBefore
  conn.write('\n')
  await assert.rejects(first, /answered "status" with a line longer than/)
  const second = channel.request('status', {}, 2000)
  conn.write('{"ok":true,"second":true}\n')
  assert.equal((await second).second, true)
  // Held whole, the line alone would be 64 MiB of heap.
  assert.ok(heapGrowth < 48 * 1024 * 1024, `64 MiB without a newline grew the heap by ${(heapGrowth / 2 ** 20).toFixed(0)} MiB`)
})
