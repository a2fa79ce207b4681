import assert from 'node:assert/strict'
import { spawn, type ChildProcess } from 'node:child_process'
import { test } from 'node:test'
import { WarmPool, type InstanceFactory, type PoolPolicy, type PoolStats } from '../../src/pool/warm-pool.js'
import { rejectsWith } from '../helpers/assertions.js'

/**
 * Real child processes stand in for VMs: each takes a moment to become
 * ready (it prints "ready"), has a pid that can be checked, and must be
 * killed to go away. The pool's logic is the same for both.
 */
class ProcessFactory implements InstanceFactory<ChildProcess> {
  made = 0
  destroyed: number[] = []
  concurrent = 0
  peakConcurrent = 0

  async create (): Promise<ChildProcess> {
    this.concurrent++
    this.peakConcurrent = Math.max(this.peakConcurrent, this.concurrent)
    try {
      const child = spawn('sh', ['-c', 'sleep 0.1; echo ready; exec sleep 300'], { stdio: ['ignore', 'pipe', 'ignore'] })
      await new Promise<void>((resolve, reject) => {
        child.stdout?.once('data', () => resolve())
        child.once('error', reject)
      })
      this.made++
      return child
    } finally {
      this.concurrent--
    }
  }

  async destroy (child: ChildProcess): Promise<void> {
    const closed = new Promise((resolve) => child.once('close', resolve))
    child.kill('SIGKILL')
    await closed
    this.destroyed.push(child.pid ?? -1)
  }
}

const policy = (p: Partial<PoolPolicy>): PoolPolicy => ({ min: 2, max: 4, onEmpty: 'reject', queueTimeoutMs: 2000, onRelease: 'destroy', refillConcurrency: 2, ...p })

async function until (pool: WarmPool<ChildProcess>, check: (s: PoolStats) => boolean, timeoutMs = 5000): Promise<PoolStats> {
  const deadline = Date.now() + timeoutMs
  while (!check(pool.stats())) {
    if (Date.now() > deadline) throw new Error(`pool never reached the state: ${JSON.stringify(pool.stats())}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  return pool.stats()
}

function alive (child: ChildProcess): boolean {
  try { process.kill(child.pid ?? -1, 0); return true } catch { return false }
}

test('a pool fills to its minimum, claims hit it, and it refills after claims', async (t) => {
  const factory = new ProcessFactory()
  const pool = new WarmPool(factory, policy({ min: 2, max: 4 }))
  t.after(async () => { await pool.close() })
  pool.start()
  await until(pool, (s) => s.ready === 2)
  const a = await pool.claim()
  const b = await pool.claim()
  assert.deepEqual([a.path, b.path], ['pool', 'pool'])
  assert.ok(alive(a.instance) && alive(b.instance))
  const refilled = await until(pool, (s) => s.ready === 2)
  assert.equal(refilled.claimed, 2)
  assert.equal(refilled.hits, 2)
  assert.equal(factory.made, 4, 'two to fill, two to refill: max (4) reached, no more')
  await pool.release(a.instance)
  await pool.release(b.instance)
})

test('empty pool, "reject": a clear error; "create": one made beyond the pool', async (t) => {
  const factory = new ProcessFactory()
  const pool = new WarmPool(factory, policy({ min: 0, max: 1 }))
  t.after(async () => { await pool.close() })
  await rejectsWith(pool.claim(), 'UIG_ERR_POOL_EMPTY')
  const first = await pool.claim({ onEmpty: 'create' })
  const second = await pool.claim({ onEmpty: 'create' })
  assert.deepEqual([first.path, second.path], ['cold', 'cold'])
  assert.equal(pool.stats().claimed, 2, '"create" goes beyond max')
  assert.equal(pool.stats().misses, 3)
  await pool.release(first.instance)
  await pool.release(second.instance)
})

test('empty pool, "queue": a claim waits for the next instance, or times out', async (t) => {
  const factory = new ProcessFactory()
  const pool = new WarmPool(factory, policy({ min: 0, max: 1, onEmpty: 'queue', queueTimeoutMs: 3000 }))
  t.after(async () => { await pool.close() })
  const queued = await pool.claim()
  assert.equal(queued.path, 'pool')
  assert.ok(queued.waitedMs >= 90, `waited ${queued.waitedMs} ms for the instance to be made`)
  // max is 1 and it is claimed: the next queued claim can only time out.
  await rejectsWith(pool.claim({ queueTimeoutMs: 300 }), 'UIG_ERR_POOL_TIMEOUT')
  assert.equal(pool.stats().waits, 2)
  // A release with "recycle" makes a fresh instance, which a waiting claim gets.
  const waiting = pool.claim()
  await pool.release(queued.instance, { onRelease: 'recycle' })
  const next = await waiting
  assert.notEqual(next.instance.pid, queued.instance.pid)
  await pool.release(next.instance)
})

test('release: "destroy" ends the instance; "recycle" ends it and puts a fresh one in the pool', async (t) => {
  const factory = new ProcessFactory()
  const pool = new WarmPool(factory, policy({ min: 1, max: 3, onRelease: 'recycle' }))
  t.after(async () => { await pool.close() })
  pool.start()
  await until(pool, (s) => s.ready === 1)
  const a = await pool.claim()
  await until(pool, (s) => s.ready === 1)
  await pool.release(a.instance)
  assert.ok(!alive(a.instance), 'a recycled instance is never reused')
  assert.ok(factory.destroyed.includes(a.instance.pid ?? -2))
  await until(pool, (s) => s.ready === 2 && s.claimed === 0)
  const b = await pool.claim()
  assert.notEqual(b.instance.pid, a.instance.pid)
  await pool.release(b.instance, { onRelease: 'destroy' })
  assert.ok(!alive(b.instance))
  await rejectsWith(pool.release(b.instance), 'UIG_ERR_POOL_NOT_CLAIMED')
})

test('refill is bounded: never more than refillConcurrency made at once', async (t) => {
  const factory = new ProcessFactory()
  const pool = new WarmPool(factory, policy({ min: 6, max: 6, refillConcurrency: 2 }))
  t.after(async () => { await pool.close() })
  pool.start()
  await until(pool, (s) => s.ready === 6)
  assert.equal(factory.peakConcurrent, 2)
  await pool.resize(2, 3)
  assert.equal(pool.stats().ready, 3, 'shrinking to max 3 destroys the extra ready instances')
  assert.equal(factory.destroyed.length, 3)
})

test('invalid policies are rejected with the field named', () => {
  const factory = new ProcessFactory()
  assert.throws(() => new WarmPool(factory, policy({ min: 5, max: 2 })), /min \(5\) is larger than max \(2\)/)
  assert.throws(() => new WarmPool(factory, policy({ max: 0 })), /max must be/)
  assert.throws(() => new WarmPool(factory, policy({ refillConcurrency: 0 })), /refillConcurrency/)
})

test('close destroys ready instances and fails queued claims', async () => {
  const factory = new ProcessFactory()
  const pool = new WarmPool(factory, policy({ min: 2, max: 2, onEmpty: 'queue' }))
  pool.start()
  await until(pool, (s) => s.ready === 2)
  const a = await pool.claim()
  const b = await pool.claim()
  const queued = pool.claim()
  await pool.close()
  await rejectsWith(queued, 'UIG_ERR_POOL_CLOSED')
  await factory.destroy(a.instance)
  await factory.destroy(b.instance)
  await until(pool, (s) => s.ready === 0 && s.creating === 0)
})

test('stop (the daemon going away) makes no more instances and destroys none', async () => {
  const factory = new ProcessFactory()
  const pool = new WarmPool(factory, policy({ min: 2, max: 4, onEmpty: 'queue' }))
  pool.start()
  await until(pool, (s) => s.ready === 2)
  const claimed = await pool.claim()
  const queued = pool.claim({ queueTimeoutMs: 10_000 })
  const queuedBeforeStop = pool.claim({ queueTimeoutMs: 10_000 })
  pool.stop()
  await rejectsWith(queuedBeforeStop, 'UIG_ERR_POOL_CLOSED')
  const first = await queued.catch(() => undefined)
  await until(pool, (s) => s.creating === 0)
  const made = factory.made
  await new Promise((resolve) => setTimeout(resolve, 300))
  assert.equal(factory.made, made, 'nothing is made after stop')
  assert.deepEqual(factory.destroyed, [], 'nothing is destroyed: the next daemon adopts the instances')
  assert.ok(alive(claimed.instance))
  for (const child of [claimed.instance, first?.instance]) if (child !== undefined) await factory.destroy(child)
  await pool.close()
})

test('a pool whose makes fail retries with a backoff until it is back at min, with no claim to prompt it', { timeout: 20_000 }, async () => {
  // The first three makes fail (as a VM whose image vanished, or a full disk, would); then they succeed.
  const real = new ProcessFactory()
  let attempts = 0
  const attemptTimes: number[] = []
  const failing: InstanceFactory<ChildProcess> = {
    create: async () => {
      attempts++
      attemptTimes.push(Date.now())
      if (attempts <= 3) throw new Error(`make ${attempts} failed`)
      return await real.create()
    },
    destroy: async (c) => { await real.destroy(c) }
  }
  const pool = new WarmPool(failing, policy({ min: 2, refillConcurrency: 1, retryBaseMs: 100, retryMaxMs: 400 }))
  const failures: Array<{ consecutiveFailures: number, retryInMs: number }> = []
  pool.on('create-failed', (f: { consecutiveFailures: number, retryInMs: number }) => failures.push(f))
  let recovered = 0
  pool.on('recovered', () => { recovered++ })
  try {
    pool.start()
    const failingState = await until(pool, (s) => s.consecutiveFailures === 2)
    assert.equal(failingState.lastError, 'make 2 failed')
    assert.ok(failingState.retryAt !== null && Date.parse(failingState.retryAt) > Date.now() - 50, 'the status says when it tries again')
    const healed = await until(pool, (s) => s.ready === 2)
    assert.equal(healed.failures, 3)
    assert.equal(healed.consecutiveFailures, 0)
    assert.equal(healed.retryAt, null)
    assert.deepEqual(failures.map((f) => [f.consecutiveFailures, f.retryInMs]), [[1, 100], [2, 200], [3, 400]], 'the backoff doubles up to its maximum')
    assert.equal(recovered, 1)
    // The waits between attempts grew with the backoff: no tight loop.
    const gaps = attemptTimes.slice(1, 4).map((t, i) => t - (attemptTimes[i] ?? t))
    assert.ok((gaps[0] ?? 0) >= 90 && (gaps[1] ?? 0) >= 190 && (gaps[2] ?? 0) >= 390, `gaps ${gaps.join(', ')} ms`)
  } finally {
    await pool.close()
  }
})
