import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { describe, test } from 'node:test'
import { CLONE_SAFE_PRELOAD } from '../../src/guest/image-sources.js'

/**
 * The clone-safety preload keeps Node's own behaviour: every case below runs
 * in a node without it and in one with it, and must give the same shape of
 * result (types, lengths, untouched bytes outside the asked range) and the
 * same errors (code, name, message).
 */
const CASES = String.raw`
const c = require('node:crypto')
const out = {}
const shape = (v) => {
  if (v === undefined || v === null) return String(v)
  if (typeof v === 'string') return 'string:' + v.length + ':' + v.replace(/[0-9a-f]/g, 'x')
  if (typeof v === 'number') return 'number:' + (Number.isInteger(v) ? 'int' : 'float')
  if (ArrayBuffer.isView(v)) return v.constructor.name + ':' + v.byteLength
  if (v instanceof ArrayBuffer) return 'ArrayBuffer:' + v.byteLength
  return typeof v
}
const error = (e) => ({ code: e.code, name: e.name, message: e.message })
function run (name, f) {
  try { out[name] = shape(f()) } catch (e) { out[name] = error(e) }
}
/** Which bytes are still 0xAA after a fill: the ones outside the range (a random byte is 0xAA by chance 1 in 256, so 32 bytes of sentinel hold). */
function untouched (buf) {
  const u8 = buf instanceof ArrayBuffer ? new Uint8Array(buf) : new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength)
  return [...u8].map((b, i) => b === 0xaa ? i : -1).filter((i) => i >= 0).join(',')
}
function region (name, make, fill) {
  let seen = ''
  for (let round = 0; round < 3; round++) {
    const buf = make()
    const u8 = buf instanceof ArrayBuffer ? new Uint8Array(buf) : new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength)
    u8.fill(0xaa)
    try { fill(buf) } catch (e) { out[name] = error(e); return }
    // Keep the positions untouched in every round: a chance 0xAA does not repeat three times.
    const now = untouched(buf).split(',')
    seen = round === 0 ? now : seen.filter((i) => now.includes(i))
  }
  out[name] = seen.join(',')
}
const big = new ArrayBuffer(64)
run('randomBytes', () => c.randomBytes(16))
run('randomBytes 0', () => c.randomBytes(0))
run('randomBytes -1', () => c.randomBytes(-1))
run('randomBytes str', () => c.randomBytes('8'))
run('randomBytes bad cb', () => c.randomBytes(8, 'x'))
run('randomFillSync str', () => c.randomFillSync('x'))
run('randomFillSync offset', () => c.randomFillSync(new Uint8Array(4), 5))
run('randomFillSync size', () => c.randomFillSync(new Uint8Array(4), 1, 4))
run('randomFillSync returns', () => c.randomFillSync(new Uint16Array(4)))
region('randomFillSync u32 1 2', () => new Uint32Array(8), (b) => c.randomFillSync(b, 1, 2))
region('randomFillSync u16 3', () => new Uint16Array(8), (b) => c.randomFillSync(b, 3))
region('randomFillSync view', () => new Uint8Array(big, 8, 32), (b) => c.randomFillSync(b, 4, 8))
region('randomFillSync dataview', () => new DataView(new ArrayBuffer(32), 4, 16), (b) => c.randomFillSync(b, 2, 5))
region('randomFillSync arraybuffer', () => new ArrayBuffer(32), (b) => c.randomFillSync(b, 30))
region('randomFillSync float', () => new Float64Array(4), (b) => c.randomFillSync(b, 1.5))
run('randomFill no cb', () => c.randomFill(new Uint8Array(4)))
run('randomFill bad cb', () => c.randomFill(new Uint8Array(4), 0, 4, 'x'))
run('randomFill ab offset cb', () => c.randomFill(new ArrayBuffer(8), 2, () => {}))
run('randomUUID', () => c.randomUUID())
run('randomUUID unbuffered', () => c.randomUUID({ disableEntropyCache: true }))
run('randomUUID bad', () => c.randomUUID(1))
run('randomUUID bad flag', () => c.randomUUID({ disableEntropyCache: 1 }))
run('randomInt', () => c.randomInt(10))
run('randomInt range', () => { const n = c.randomInt(-5, 5); return n >= -5 && n < 5 })
run('randomInt bad', () => c.randomInt(5, 1))
run('randomInt unsafe', () => c.randomInt(2 ** 53))
run('randomInt too wide', () => c.randomInt(0, 2 ** 49))
run('randomInt float', () => c.randomInt(1.5))
run('randomInt bad cb', () => c.randomInt(1, 5, 'x'))
run('getRandomValues', () => c.getRandomValues(new Int32Array(4)))
run('getRandomValues float', () => c.getRandomValues(new Float32Array(4)))
run('getRandomValues big', () => c.getRandomValues(new Uint8Array(65537)))
run('webcrypto', () => c.webcrypto.getRandomValues(new Uint8Array(4)))
run('webcrypto this', () => c.webcrypto.getRandomValues.call({}, new Uint8Array(4)))
run('globalThis.crypto', () => globalThis.crypto.getRandomValues(new BigUint64Array(2)))
run('Math.random', () => Array.from({ length: 100 }, Math.random).every((x) => x >= 0 && x < 1 && x !== Math.floor(x * 2 ** 53) / 2 ** 53 + 1))
for (const f of ['randomBytes', 'randomFill', 'randomFillSync', 'randomUUID', 'randomInt', 'getRandomValues']) out['fn ' + f] = c[f].name + '/' + c[f].length
out['fn webcrypto'] = c.webcrypto.getRandomValues.name + '/' + c.webcrypto.getRandomValues.length
out['fn Math.random'] = Math.random.name + '/' + Math.random.length + '/' + Object.keys(Math).includes('random')
let pending = 0
const later = (name, f) => { pending++; f((...args) => { out[name] = args.map((a) => a instanceof Error ? error(a) : shape(a)); if (--pending === 0) done() }) }
let sync = true
later('randomBytes cb', (cb) => c.randomBytes(8, cb))
later('randomFill cb', (cb) => c.randomFill(new Uint32Array(4), cb))
later('randomFill offset cb', (cb) => { const b = new Uint8Array(16).fill(0xaa); c.randomFill(b, 12, (e, r) => cb(e, untouched(r).split(',').filter((i) => i < 12).length)) })
later('randomFill offset size cb', (cb) => { const b = new Uint16Array(8).fill(0xaaaa); c.randomFill(b, 2, 3, (e, r) => cb(e, r === b)) })
later('randomFill async', (cb) => { let async = false; c.randomFill(new Uint8Array(4), () => cb(async)); async = true })
later('randomInt cb', (cb) => c.randomInt(3, 9, cb))
later('randomInt cb async', (cb) => { const at = sync; c.randomInt(9, () => cb(at !== sync)) })
later('randomBytes this', (cb) => c.randomBytes(4, function () { cb(this === undefined || this === globalThis ? 'plain' : typeof this) }))
sync = false
function done () { console.log(JSON.stringify(out)) }
`

async function runNode (args: string[]): Promise<Record<string, unknown>> {
  return await new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...args, '-e', CASES], { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (c: Buffer) => { stdout += c.toString() })
    child.stderr.on('data', (c: Buffer) => { stderr += c.toString() })
    child.on('error', reject)
    child.on('close', (code) => {
      if (code !== 0) reject(new Error(`node exited ${code}: ${stderr}`))
      else resolve(JSON.parse(stdout) as Record<string, unknown>)
    })
  })
}

describe('the Node.js clone-safety preload', () => {
  test('patched APIs keep Node\'s signatures, results, byte ranges, callbacks and errors', { timeout: 60_000 }, async () => {
    const [plain, patched] = await Promise.all([runNode([]), runNode(['--require', CLONE_SAFE_PRELOAD])])
    assert.deepEqual(patched, plain)
    assert.equal(plain['randomFillSync u32 1 2'], '0,1,2,3,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31', 'the case really tests a range')
  })

  test('the after-clone signal marks the key stale and acknowledges on $UIGNITER_ACK_FD, after the app\'s own listeners', { timeout: 60_000 }, async () => {
    const script = String.raw`
      const state = globalThis[Symbol.for('uigniter.cloneSafe')]
      const before = state.rekeys
      let own = false
      process.on('SIGUSR2', () => { own = true })
      require('node:fs').writeSync(1, 'ready\n')
      setTimeout(() => {
        const signalled = { rekeys: state.rekeys, stale: state.stale }
        require('node:crypto').randomUUID()
        console.log(JSON.stringify({ before, signalled, drawn: { rekeys: state.rekeys, stale: state.stale }, own }))
      }, 3000)
    `
    const child = spawn(process.execPath, ['--require', CLONE_SAFE_PRELOAD, '-e', script], { stdio: ['ignore', 'pipe', 'inherit', 'pipe'], env: { ...process.env, UIGNITER_ACK_FD: '3' } })
    let stdout = ''
    const ack = child.stdio[3] as NodeJS.ReadableStream
    const acked = new Promise<string>((resolve) => ack.once('data', (c: Buffer) => resolve(c.toString())))
    await new Promise<void>((resolve) => child.stdout?.on('data', (c: Buffer) => { stdout += c.toString(); if (stdout.includes('ready\n')) resolve() }))
    child.kill('SIGUSR2')
    assert.equal(await acked, '+')
    await new Promise((resolve) => child.on('close', resolve))
    // The key is stale from the signal on, and drawn anew by the first output after it.
    assert.deepEqual(JSON.parse(stdout.split('\n')[1] ?? ''), { before: 1, signalled: { rekeys: 1, stale: true }, drawn: { rekeys: 2, stale: false }, own: true })
  })
})
