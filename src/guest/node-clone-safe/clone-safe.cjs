'use strict'
/*
 * uigniter's clone-safety preload for Node.js images (loaded with
 * NODE_OPTIONS=--require /uigniter/clone-safe.cjs).
 *
 * A clone of a `ready: app` template resumes the template's memory, so every
 * generator the process keeps in user space (OpenSSL's DRBG behind
 * crypto.randomBytes, V8's Math.random state, Node's randomUUID and randomInt
 * caches) holds the same state in every clone. The kernel's generator is
 * reseeded per clone by the init. This module mixes a per-instance key,
 * drawn from the kernel, into every output of the APIs below: each output is
 * XORed with an AES-256-CTR keystream under that key, so it stays uniformly
 * random and differs between clones once the key is re-drawn. The key is
 * re-drawn after the after-clone signal (SIGUSR2, or
 * $UIGNITER_CLONE_SAFE_SIGNAL): its listener marks the key stale and then
 * tells the init through its ack fd ($UIGNITER_ACK_FD), so no request
 * reaches the app before; the first output after it draws the new key (and
 * drops the caches this module keeps: UUIDs, randomInt, Math.random). Doing
 * the drawing there rather than in the listener keeps the hook itself short:
 * under TCG a fresh clone translates every code path it runs anew.
 * A second trigger needs no hook: the init's identity steps the wall clock
 * of every clone to the host's time, while the monotonic clock runs on from
 * the snapshot, so a change of their difference also marks the key stale.
 * It costs two clock reads (vDSO, no system call) per output; the hook stays
 * the guarantee, this is the net for a template whose hook was replaced.
 *
 * Covered: crypto.randomBytes, randomFill, randomFillSync, randomUUID,
 * randomInt, getRandomValues, webcrypto.getRandomValues (= globalThis.crypto),
 * Math.random. Not covered: OpenSSL's own use inside the process (TLS
 * handshakes, generateKeyPair, createECDH, createDiffieHellman, generatePrime,
 * webcrypto.subtle), native addons, and anything the app derived before the
 * snapshot. Argument checking, errors, callbacks and sync/async behaviour are
 * Node's own: every patched function calls the original first.
 */
const crypto = require('node:crypto')
const fs = require('node:fs')

const original = {
  randomBytes: crypto.randomBytes,
  randomFill: crypto.randomFill,
  randomFillSync: crypto.randomFillSync,
  randomUUID: crypto.randomUUID,
  randomInt: crypto.randomInt
}
const webcrypto = crypto.webcrypto
const webGetRandomValues = Object.getPrototypeOf(webcrypto).getRandomValues

let cipher
let rekeys = 0
/** Set by the after-clone signal: the next output draws a new key first. */
let stale = false
/** Wall clock minus monotonic clock, in ms, when the key was drawn; a step of more than CLOCK_STEP_MS means a clone took its identity. */
const CLOCK_STEP_MS = 20
const clockOffset = () => Date.now() - performance.now()
let keyedOffset = 0

/** Draws a new key first when the signal or a clock step said this may be a new instance. */
function fresh () {
  if (stale || Math.abs(clockOffset() - keyedOffset) > CLOCK_STEP_MS) rekey()
}

/** Bytes straight from the kernel's generator, which the init reseeds per clone; never from OpenSSL. */
function kernelBytes (n) {
  const out = Buffer.alloc(n)
  const fd = fs.openSync('/dev/urandom', 'r')
  try {
    let off = 0
    while (off < n) off += fs.readSync(fd, out, off, n - off, null)
  } finally {
    fs.closeSync(fd)
  }
  return out
}

/** A new instance key (and counter), and no bytes left over from the old one. */
function rekey () {
  stale = false
  keyedOffset = clockOffset()
  const material = kernelBytes(48)
  cipher = crypto.createCipheriv('aes-256-ctr', material.subarray(0, 32), material.subarray(32))
  uuidOffset = UUID_CACHE
  intOffset = INT_CACHE
  mathOffset = MATH_CACHE
  rekeys++
}

/** XORs the keystream into bytes `offset..offset+size` of buf (an ArrayBuffer or a view), in place. */
function mix (buf, offset, size) {
  fresh()
  if (size <= 0) return
  const bytes = buf instanceof ArrayBuffer || (typeof SharedArrayBuffer !== 'undefined' && buf instanceof SharedArrayBuffer)
    ? new Uint8Array(buf, offset, size)
    : new Uint8Array(buf.buffer, buf.byteOffset + offset, size)
  bytes.set(cipher.update(bytes))
}

const elementSize = (buf) => buf.BYTES_PER_ELEMENT || 1

function copyShape (patched, orig) {
  Object.defineProperty(patched, 'name', { value: orig.name })
  Object.defineProperty(patched, 'length', { value: orig.length })
  return patched
}

// The byte ranges below are Node 20's own (lib/internal/crypto/random.js, assertOffset and
// assertSize): offsets and sizes count elements of a TypedArray, and become uint32 bytes.

function randomFillSync (buf, offset = 0, size) {
  const out = original.randomFillSync.apply(this, arguments)
  const es = elementSize(buf)
  const off = (offset * es) >>> 0
  mix(buf, off, size === undefined ? buf.byteLength - off : (size * es) >>> 0)
  return out
}

function randomFill (buf, offset, size, _callback) {
  const es = elementSize(buf)
  let off, len, cbIndex
  if (typeof offset === 'function') {
    cbIndex = 1
    off = 0
    len = buf.length === undefined ? buf.byteLength : (buf.length * es) >>> 0
  } else if (typeof size === 'function') {
    cbIndex = 2
    off = (offset * es) >>> 0
    len = ((buf.length - offset) * es) >>> 0
  } else {
    cbIndex = 3
    off = (offset * es) >>> 0
    len = size === undefined ? buf.byteLength - off : (size * es) >>> 0
  }
  const args = Array.prototype.slice.call(arguments, 0, Math.max(arguments.length, cbIndex + 1))
  const cb = args[cbIndex]
  if (typeof cb === 'function') {
    args[cbIndex] = function (err, _filled) {
      if (!err) mix(buf, off, len)
      return cb.apply(this, arguments)
    }
  }
  return original.randomFill.apply(this, args)
}

function randomBytes (size, callback) {
  if (callback === undefined) {
    const buf = original.randomBytes(size)
    mix(buf, 0, buf.length)
    return buf
  }
  if (typeof callback !== 'function') return original.randomBytes(size, callback)
  return original.randomBytes(size, function (err, buf) {
    if (err) return callback.call(this, err)
    mix(buf, 0, buf.length)
    return callback.call(this, null, buf)
  })
}

// randomUUID: Node's batch of 128 is in the snapshot too; ours is dropped at each rekey.
const UUID_CACHE = 16 * 128
const uuidData = Buffer.alloc(UUID_CACHE)
let uuidOffset = UUID_CACHE
const hex = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'))

function formatUuid (b, o) {
  return hex[b[o]] + hex[b[o + 1]] + hex[b[o + 2]] + hex[b[o + 3]] + '-' +
    hex[b[o + 4]] + hex[b[o + 5]] + '-' +
    hex[(b[o + 6] & 0x0f) | 0x40] + hex[b[o + 7]] + '-' +
    hex[(b[o + 8] & 0x3f) | 0x80] + hex[b[o + 9]] + '-' +
    hex[b[o + 10]] + hex[b[o + 11]] + hex[b[o + 12]] + hex[b[o + 13]] + hex[b[o + 14]] + hex[b[o + 15]]
}

function randomUUID (options) {
  // Node's own checks of `options` (and its errors) when there are options to check.
  if (options !== undefined) original.randomUUID(options)
  if (options !== undefined && options.disableEntropyCache === true) return formatUuid(randomBytes(16), 0)
  fresh()
  if (uuidOffset === UUID_CACHE) {
    randomFillSync(uuidData)
    uuidOffset = 0
  }
  const uuid = formatUuid(uuidData, uuidOffset)
  uuidOffset += 16
  return uuid
}

// randomInt: Node's algorithm (6-byte draws, rejection above the largest multiple of the range), over our bytes.
const RAND_MAX = 0xFFFF_FFFF_FFFF
const INT_CACHE = 6 * 1024
const intData = Buffer.alloc(INT_CACHE)
let intOffset = INT_CACHE

function randomInt (min, max, callback) {
  const minNotSpecified = typeof max === 'undefined' || typeof max === 'function'
  // Node's checks and errors: a sync call of the original with the same bounds
  // (with the callback, when it is not a function, so that it complains first).
  const cb = minNotSpecified ? max : callback
  if (cb !== undefined && typeof cb !== 'function') return original.randomInt.apply(this, arguments)
  if (minNotSpecified) original.randomInt(min)
  else original.randomInt(min, max)
  if (minNotSpecified) {
    max = min
    min = 0
  }
  const range = max - min
  const randLimit = RAND_MAX - (RAND_MAX % range)
  fresh()
  for (;;) {
    if (intOffset === INT_CACHE) {
      randomFillSync(intData)
      intOffset = 0
    }
    const x = intData.readUIntBE(intOffset, 6)
    intOffset += 6
    if (x < randLimit) {
      const n = (x % range) + min
      if (cb === undefined) return n
      process.nextTick(cb, undefined, n)
      return
    }
  }
}

function getRandomValues (array) {
  const out = Reflect.apply(webGetRandomValues, this, arguments)
  mix(array, 0, array.byteLength)
  return out
}

// Math.random: 53 bits of our bytes per call, as V8 gives, from a buffer dropped at each rekey.
const MATH_CACHE = 8 * 512
const mathData = Buffer.alloc(MATH_CACHE)
let mathOffset = MATH_CACHE

function random () {
  fresh()
  if (mathOffset === MATH_CACHE) {
    randomFillSync(mathData)
    mathOffset = 0
  }
  const hi = mathData.readUInt32LE(mathOffset) >>> 11
  const lo = mathData.readUInt32LE(mathOffset + 4)
  mathOffset += 8
  return (hi * 0x1_0000_0000 + lo) / 2 ** 53
}

rekey()

crypto.randomBytes = copyShape(randomBytes, original.randomBytes)
crypto.randomFill = copyShape(randomFill, original.randomFill)
crypto.randomFillSync = copyShape(randomFillSync, original.randomFillSync)
crypto.randomUUID = copyShape(randomUUID, original.randomUUID)
crypto.randomInt = copyShape(randomInt, original.randomInt)
// crypto.getRandomValues calls webcrypto.getRandomValues, so this covers all three.
Object.defineProperty(webcrypto, 'getRandomValues', { value: copyShape(getRandomValues, webGetRandomValues), writable: true, enumerable: true, configurable: true })
// The deprecated aliases of randomBytes return Node's own function: keep their warning, give ours.
for (const alias of ['prng', 'pseudoRandomBytes', 'rng']) {
  const d = Object.getOwnPropertyDescriptor(crypto, alias)
  if (d === undefined || !d.configurable || d.get === undefined) continue
  Object.defineProperty(crypto, alias, { ...d, get () { d.get.call(this); return crypto.randomBytes } })
}
Object.defineProperty(Math, 'random', { value: copyShape(random, Math.random), writable: true, enumerable: false, configurable: true })
// ESM's `import { randomUUID } from 'node:crypto'` reads the exports as they are now.
require('node:module').syncBuiltinESMExports()

const signal = process.env.UIGNITER_CLONE_SAFE_SIGNAL || 'SIGUSR2'
const ackFd = /^\d+$/.test(process.env.UIGNITER_ACK_FD || '') ? Number(process.env.UIGNITER_ACK_FD) : undefined
process.on(signal, () => {
  stale = true
  // After every listener of this emit ran (the app's own, too), so that the ack means "all rekeyed".
  process.nextTick(() => {
    if (ackFd === undefined) return
    try {
      fs.writeSync(ackFd, '+')
    } catch (err) {
      process.emitWarning(`uigniter clone-safe: cannot acknowledge the after-clone signal on fd ${ackFd}: ${err.message}`)
    }
  })
})

Object.defineProperty(globalThis, Symbol.for('uigniter.cloneSafe'), { value: Object.freeze({ rekey, get rekeys () { return rekeys }, get stale () { return stale }, signal }) })
