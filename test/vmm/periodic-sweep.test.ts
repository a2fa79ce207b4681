import assert from 'node:assert/strict'
import { test } from 'node:test'
import { PeriodicSweep } from '../../src/vmm/qemu/periodic-sweep.js'

test('one round checks every item, a bounded number at a time; a failing check is reported and the others still run', async () => {
  let inFlight = 0
  let most = 0
  const seen: number[] = []
  const errors: number[] = []
  const sweep = new PeriodicSweep<number>(60_000, async (n) => {
    inFlight++
    most = Math.max(most, inFlight)
    await new Promise((resolve) => setTimeout(resolve, 2))
    inFlight--
    if (n % 10 === 0) throw new Error(`item ${n}`)
    seen.push(n)
  }, (_err, n) => { errors.push(n) }, 4)
  for (let i = 1; i <= 50; i++) sweep.add(i)
  await sweep.runOnce()
  assert.equal(seen.length, 45)
  assert.deepEqual(errors.sort((a, b) => a - b), [10, 20, 30, 40, 50])
  assert.ok(most <= 4, `at most 4 at a time, saw ${most}`)
  for (let i = 1; i <= 50; i++) sweep.delete(i)
  assert.equal(sweep.size, 0)
})

test('the timer runs rounds only while there are items, never two at once, and an item deleted meanwhile is skipped', async () => {
  const checked: string[] = []
  let release: (() => void) | undefined
  const sweep = new PeriodicSweep<string>(10, async (item) => {
    checked.push(item)
    if (item === 'slow') await new Promise<void>((resolve) => { release = resolve })
  }, () => {}, 1)
  sweep.add('slow')
  sweep.add('late')
  await new Promise((resolve) => setTimeout(resolve, 60))
  // The first round is stuck on 'slow': no new round began.
  assert.deepEqual(checked, ['slow'])
  sweep.delete('late')
  release?.()
  await new Promise((resolve) => setTimeout(resolve, 5))
  assert.ok(!checked.includes('late'), 'deleted during the round, so not checked')
  sweep.delete('slow')
  const count = checked.length
  await new Promise((resolve) => setTimeout(resolve, 60))
  assert.equal(checked.length, count, 'no rounds with nothing to check')
})

test('a sweep refuses an interval that a timer would not keep', () => {
  assert.throws(() => new PeriodicSweep(0, async () => {}, () => {}), /positive number/)
})
