import assert from 'node:assert/strict'
import { once } from 'node:events'
import { createServer, type Socket } from 'node:net'
import { join } from 'node:path'
import { test, type TestContext } from 'node:test'
import fc from 'fast-check'
import { ANNOUNCING_INIT_VERSION, sendIdentity, waitForIdentityWait } from '../../src/snapshot/guest-identity.js'
import { ControlChannel } from '../../src/vmm/qemu/control-channel.js'
import { rejectsWith, tempDir } from '../helpers/assertions.js'
import { writeInPieces } from '../helpers/split-write.js'

/**
 * The host side of the identity protocol against a hand-written guest (a
 * unix socket server speaking the init's lines): the wait is heard, not
 * polled; what the guest claims about its own timing is only taken when it
 * is a plausible number. The real init is covered by guest-identity.test.ts.
 */

/** A fake guest: `onConnect` writes what the guest volunteers, `onLine` answers each command line. */
async function fakeGuest (t: TestContext, guest: { onConnect?: (s: Socket) => void, onLine?: (s: Socket, line: string) => void }): Promise<{ path: string, lines: string[] }> {
  const path = join(await tempDir(t), 'ctl.sock')
  const lines: string[] = []
  const server = createServer((socket) => {
    socket.on('error', () => socket.destroy())
    socket.setEncoding('utf8')
    let buffered = ''
    socket.on('data', (text: string) => {
      buffered += text
      let nl: number
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl)
        buffered = buffered.slice(nl + 1)
        lines.push(line)
        guest.onLine?.(socket, line)
      }
    })
    guest.onConnect?.(socket)
  })
  server.listen(path)
  await once(server, 'listening')
  t.after(() => { server.close() })
  return { path, lines }
}

const IDENTITY = { guestNetwork: { address: '10.0.2.16', prefix: 24, gateway: '10.0.2.2' }, mac: '02:00:00:00:00:16', hostname: 'c1' }

test('waitForIdentityWait resolves on the announcement, sends nothing, and ignores other events and junk before it', async (t) => {
  const { path, lines } = await fakeGuest(t, {
    onConnect: (s) => {
      void writeInPieces(s, Buffer.from('tail of a torn line\n{"event":"exit","code":0}\n{"event":"waiting","for":"something-else"}\n' +
        `{"event":"waiting","for":"identity","version":${ANNOUNCING_INIT_VERSION}}\n`), [0.1, 0.5, 0.93])
    }
  })
  await waitForIdentityWait(path, 5000)
  assert.deepEqual(lines, [], 'the host asked nothing')
})

test('waitForIdentityWait: a guest that never announces fails at the deadline with advice; one that hangs up fails at once', async (t) => {
  const silent = await fakeGuest(t, {})
  const t0 = Date.now()
  await rejectsWith(waitForIdentityWait(silent.path, 300), 'UIG_ERR_TEMPLATE_FAILED', 'within 300 ms', 'rebuild the image')
  assert.ok(Date.now() - t0 < 3000)
  const rude = await fakeGuest(t, { onConnect: (s) => { setTimeout(() => s.destroy(), 20) } })
  const t1 = Date.now()
  await rejectsWith(waitForIdentityWait(rude.path, 10_000), 'UIG_ERR_TEMPLATE_FAILED', 'closed')
  assert.ok(Date.now() - t1 < 5000, 'a closed channel does not wait for the deadline')
})

test('waitForIdentityWait with an init older than the announcement asks `status` once', async (t) => {
  const { path, lines } = await fakeGuest(t, { onLine: (s, line) => { if (line === 'status') s.write('{"ok":true,"app":"waiting","pid":0,"uptime_ms":5}\n') } })
  await waitForIdentityWait(path, 5000, ANNOUNCING_INIT_VERSION - 1)
  assert.deepEqual(lines, ['status'])
  const running = await fakeGuest(t, { onLine: (s) => { s.write('{"ok":true,"app":"running","pid":7}\n') } })
  await rejectsWith(waitForIdentityWait(running.path, 5000, ANNOUNCING_INIT_VERSION - 1), 'UIG_ERR_TEMPLATE_FAILED', 'does not wait')
})

test('sendIdentity takes the guest\'s own time only when it is a whole, plausible number of µs', async (t) => {
  const claims: unknown[] = [1234, 0, -1, 1.5, '12', null, 1e15, Number.MAX_SAFE_INTEGER + 2]
  const seen: Array<number | undefined> = []
  for (const claim of claims) {
    const { path } = await fakeGuest(t, { onLine: (s) => { s.write(`${JSON.stringify({ ok: true, took_us: claim })}\n`) } })
    seen.push((await sendIdentity(path, IDENTITY, 5000)).guestMs)
  }
  assert.deepEqual(seen, [1.234, 0, undefined, undefined, undefined, undefined, undefined, undefined])
  const old = await fakeGuest(t, { onLine: (s) => { s.write('{"ok":true}\n') } })
  assert.equal((await sendIdentity(old.path, IDENTITY, 5000)).guestMs, undefined)
})

test('sendIdentity sends one identity line with every field, and the announcement of a waiting guest does not take the reply\'s place', async (t) => {
  const { path, lines } = await fakeGuest(t, {
    onConnect: (s) => { s.write('{"event":"waiting","for":"identity","version":3}\n') },
    onLine: (s) => { s.write('{"ok":true,"took_us":900}\n') }
  })
  const taken = await sendIdentity(path, { ...IDENTITY, env: { A: 'x y' } }, 5000)
  assert.equal(taken.guestMs, 0.9)
  assert.equal(lines.length, 1)
  assert.match(lines[0] ?? '', /^identity env=A=x%20y ip=10\.0\.2\.16\/24 gw=10\.0\.2\.2 mac=02:00:00:00:00:16 hostname=c1 seed=[0-9a-f]{64} time=\d+$/)
})

test('ControlChannel.waitForEvent: hostile lines in any pieces never resolve it falsely, nor throw', async (t) => {
  await fc.assert(fc.asyncProperty(
    fc.array(fc.oneof(
      fc.fullUnicodeString({ maxLength: 80 }).map((s) => s.replace(/\n/g, ' ')),
      fc.constantFrom('{"event":"waiting"}', '{"event":"waiting","for":"identities"}', '{"event":"waiting","for":["identity"]}', '{"event":7,"for":"identity"}', '{"for":"identity"}', '{"ok":true}')
    ), { maxLength: 8 }),
    fc.boolean(),
    fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 4 }),
    async (junk, announce, cuts) => {
      const bytes = Buffer.from(junk.map((l) => `${l}\n`).join('') + (announce ? '{"event":"waiting","for":"identity"}\n' : ''))
      const { path } = await fakeGuest(t, { onConnect: (s) => { void writeInPieces(s, bytes, cuts) } })
      const channel = await ControlChannel.connect(path, 2000)
      try {
        const heard = await channel.waitForEvent((e) => e.event === 'waiting' && e.for === 'identity', 300).then(() => true, () => false)
        assert.equal(heard, announce)
      } finally {
        channel.close()
      }
    }
  ), { numRuns: 40 })
})

test('ControlChannel.waitForEvent on a closed channel rejects at once', async (t) => {
  const { path } = await fakeGuest(t, {})
  const channel = await ControlChannel.connect(path, 2000)
  channel.close()
  await rejectsWith(channel.waitForEvent(() => true, 10_000), 'UIG_ERR_CONTROL_CHANNEL', 'closed')
})
