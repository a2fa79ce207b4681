import assert from 'node:assert/strict'
import { once } from 'node:events'
import { createServer, type Socket } from 'node:net'
import { join } from 'node:path'
import { test, type TestContext } from 'node:test'
import fc from 'fast-check'
import { UigniterError } from '../../src/core/errors.js'
import { MAX_QMP_LINE, QmpClient, QmpError, type QmpEvent } from '../../src/vmm/qemu/qmp-client.js'
import { rejectsWith, tempDir } from '../helpers/assertions.js'
import { writeInPieces } from '../helpers/split-write.js'

/**
 * A QEMU monitor that says what it is told: a greeting, then for each
 * command (after qmp_capabilities) the next script's lines, ID standing for
 * the command's id. What takes the oldest request's place is at most one
 * line a script, so that each command's outcome is known.
 */
interface Item { slot?: 'resolve' | 'qmp-error' | 'malformed', event?: boolean, text: string }

const GREETING = '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}'

const ignored: fc.Arbitrary<Item> = fc.oneof(
  fc.constantFrom('null', '5', '"x"', '[1]', '{}', '{"a":1}').map((data) => ({ event: true, text: `{"event":"STOP","data":${data},"timestamp":{"seconds":1,"microseconds":2}}` })),
  fc.constantFrom('{"event":"RESUME"}', '{"event":"X","timestamp":"late"}', '{"event":"BLOCK_JOB","data":{"deep":{"er":[1,2,{"x":null}]}}}').map((text) => ({ event: true, text })),
  // Replies to nobody: an unknown id, a stale one, ids of the wrong type.
  fc.constantFrom('{"return":{},"id":IDPLUS}', '{"return":{},"id":IDMINUS}', '{"return":{},"id":"ID"}', '{"return":{},"id":null}',
    '{"error":{"class":"X","desc":"y"},"id":[ID]}', '{"return":{},"id":{"n":ID}}').map((text) => ({ text })),
  fc.constantFrom('', '   ', '\r').map((text) => ({ text }))
)

const slot: fc.Arbitrary<Item> = fc.oneof(
  { weight: 3, arbitrary: fc.constant<Item>({ slot: 'resolve', text: '{"return":{"id":ID},"id":ID}' }) },
  // QEMU's answer to a command it could not parse has no id: the oldest request takes it.
  { weight: 1, arbitrary: fc.constant<Item>({ slot: 'resolve', text: '{"return":{"id":ID}}' }) },
  { weight: 1, arbitrary: fc.constantFrom('{"error":{"class":"GenericError","desc":"no"},"id":ID}', '{"error":5,"id":ID}', '{"error":{"class":7,"desc":null},"id":ID}', '{"error":null}')
    .map((text): Item => ({ slot: 'qmp-error', text })) },
  { weight: 2, arbitrary: fc.oneof(
    fc.string({ maxLength: 80 }).map((s) => `${s}\x00`),
    fc.constantFrom('null', '42', '[1,2]', '"QMP"', 'true', '{"hello":1}', '{"QMP":{}}', '{"execute":"quit"}', '{"return"', '}{')
  ).map((text): Item => ({ slot: 'malformed', text })) }
)

interface Script { before: Item[], slot: Item | null, after: Item[], cuts: number[] }

const script: fc.Arbitrary<Script> = fc.record({
  before: fc.array(ignored, { maxLength: 3 }),
  slot: fc.option(slot, { freq: 30 }),
  after: fc.array(ignored, { maxLength: 2 }),
  cuts: fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 3 })
})

/** A fake monitor on a unix socket; `onConnection` decides what the greeting is. */
async function fakeMonitor (t: TestContext, onConnection: (socket: Socket) => void): Promise<string> {
  const path = join(await tempDir(t), 'qmp.sock')
  const server = createServer((socket) => {
    socket.on('error', () => socket.destroy())
    onConnection(socket)
  })
  server.listen(path)
  await once(server, 'listening')
  t.after(() => { server.close() })
  return path
}

/** Reads commands (one JSON object a line) and calls `onCommand` with each id and name. */
function commands (socket: Socket, onCommand: (id: number, execute: string) => void): void {
  let buffered = ''
  socket.setEncoding('utf8')
  socket.on('data', (text: string) => {
    buffered += text
    let nl: number
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const cmd = JSON.parse(buffered.slice(0, nl)) as { execute: string, id: number }
      buffered = buffered.slice(nl + 1)
      onCommand(cmd.id, cmd.execute)
    }
  })
}

async function play (socket: Socket, s: Script, id: number): Promise<void> {
  const text = [...s.before, ...(s.slot === null ? [] : [s.slot]), ...s.after]
    .map((i) => `${i.text.replace(/IDPLUS/g, String(id + 100_000)).replace(/IDMINUS/g, String(id - 1)).replace(/ID/g, String(id))}\n`).join('')
  const bytes = Buffer.from(text)
  await writeInPieces(socket, bytes, s.cuts)
}

test('QMP: generated monitor output (events with odd data, replies to nobody, ids of the wrong type, non-JSON, non-objects, any split) fails only its own command, with a code; nothing throws', { timeout: 120_000 }, async (t) => {
  const scripts: Script[] = []
  const path = await fakeMonitor(t, (socket) => {
    socket.write(GREETING + '\n')
    commands(socket, (id, execute) => {
      if (execute === 'qmp_capabilities') {
        socket.write(`{"return": {}, "id": ${id}}\n`)
        return
      }
      const s = scripts.shift()
      if (s !== undefined) void play(socket, s, id)
      else socket.write(`{"return":{"id":${id}},"id":${id}}\n`)
    })
  })
  const qmp = await QmpClient.connect(path, { timeoutMs: 2000 })
  t.after(() => qmp.close())
  assert.equal(qmp.greeting.version.qemu.major, 7)
  let events = 0
  qmp.on('event', (e: QmpEvent) => {
    assert.equal(typeof e.event, 'string')
    assert.ok(typeof e.data === 'object' && e.data !== null && !Array.isArray(e.data))
    assert.equal(typeof e.timestamp.seconds, 'number')
    events++
  })
  let expectedEvents = 0
  const outcomes = { resolve: 0, 'qmp-error': 0, malformed: 0, timeout: 0 }
  await fc.assert(fc.asyncProperty(fc.array(script, { minLength: 25, maxLength: 25 }), async (batch: Script[]) => {
    for (const s of batch) {
      expectedEvents += [...s.before, ...s.after].filter((i) => i.event === true).length
      scripts.push(s)
      const reply = qmp.execute<{ id: number }>('query-status', undefined, { timeoutMs: 150 })
      const kind = s.slot?.slot
      if (kind === 'resolve') {
        assert.equal(typeof (await reply).id, 'number')
      } else {
        await assert.rejects(reply, (err: unknown) => {
          assert.ok(err instanceof UigniterError)
          assert.equal(err.code, 'UIG_ERR_QMP')
          if (kind === 'qmp-error') assert.ok(err instanceof QmpError && typeof err.qmpClass === 'string' && typeof err.desc === 'string')
          else if (kind === 'malformed') assert.match(err.message, /answered "query-status" with/)
          else assert.match(err.message, /did not answer "query-status" within/)
          return true
        })
      }
      outcomes[kind ?? 'timeout']++
    }
  }), { numRuns: 80 })
  t.diagnostic(`${JSON.stringify(outcomes)}; ${expectedEvents} events`)
  const deadline = Date.now() + 5000
  while (events < expectedEvents && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10))
  assert.equal(events, expectedEvents)
  // Still in step: a well-formed answer reaches its command.
  assert.ok(typeof (await qmp.execute<{ id: number }>('query-status', undefined, { timeoutMs: 2000 })).id === 'number')
  // The typed helpers refuse an answer of the wrong shape with a code, rather than hand it on.
  await rejectsWith(qmp.queryStatus(), 'UIG_ERR_QMP', 'not a status')
})

test('QMP: a malformed greeting, or something else first, fails the connect at once with a code; an unrelated object before the greeting is skipped', { timeout: 60_000 }, async (t) => {
  const bad = ['{"QMP": {}}', '{"QMP": null}', '{"QMP": {"version": {"qemu": {"major": "7", "minor": 2, "micro": 0}}, "capabilities": []}}',
    '{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}}}', 'null', '42', 'garbage', '["QMP"]', '\x00\x00\x00']
  for (const greeting of bad) {
    const path = await fakeMonitor(t, (socket) => socket.write(`${greeting}\n`))
    const began = Date.now()
    await rejectsWith(QmpClient.connect(path, { timeoutMs: 3000 }), 'UIG_ERR_QMP')
    assert.ok(Date.now() - began < 2000, `${JSON.stringify(greeting)} failed at once, not by the deadline`)
  }
  // An overlong first line: dropped as it comes, and the connect fails.
  const huge = await fakeMonitor(t, (socket) => {
    const mb = Buffer.alloc(1024 * 1024, 'z')
    for (let i = 0; i <= MAX_QMP_LINE / mb.length; i++) socket.write(mb)
    socket.write('\n')
  })
  await rejectsWith(QmpClient.connect(huge, { timeoutMs: 10_000 }), 'UIG_ERR_QMP', 'longer than')
  // Silence: the deadline, with a code.
  const silent = await fakeMonitor(t, () => {})
  await rejectsWith(QmpClient.connect(silent, { timeoutMs: 300 }), 'UIG_ERR_QMP')

  const fine = await fakeMonitor(t, (socket) => {
    socket.write('{"event":"EARLY"}\n' + GREETING + '\n')
    commands(socket, (id) => socket.write(`{"return": {"running": true, "status": "running"}, "id": ${id}}\n`))
  })
  const qmp = await QmpClient.connect(fine, { timeoutMs: 3000 })
  t.after(() => qmp.close())
  assert.deepEqual(await qmp.queryStatus(), { running: true, status: 'running' })
})
