import assert from 'node:assert/strict'
import { describe, test } from 'node:test'
import type { Autoscale } from '../../src/core/service.js'
import { scaleDecision, type ScaleInput } from '../../src/service/autoscaler.js'

const autoscale: Autoscale = { targetInFlight: 10, scaleUpCooldownMs: 5000, scaleDownCooldownMs: 30_000, idleToZeroMs: 60_000 }
const NOW = 1_000_000

function input (over: Partial<ScaleInput>): ScaleInput {
  return {
    spec: { replicas: { min: 1, max: 5 }, autoscale },
    desired: 1,
    inFlight: 0,
    recentPeakInFlight: 0,
    lastRequestAt: NOW,
    held: 0,
    lastScaleUpAt: 0,
    lastScaleDownAt: 0,
    now: NOW,
    ...over
  }
}

describe('autoscaler', () => {
  test('without autoscale and with min > 0, the count is fixed at min', () => {
    assert.equal(scaleDecision(input({ spec: { replicas: { min: 2, max: 5 } }, desired: 2, inFlight: 500 })).desired, 2)
  })

  test('scales up to in-flight / target at once, within max, after the up cooldown', () => {
    assert.equal(scaleDecision(input({ inFlight: 31, recentPeakInFlight: 31 })).desired, 4)
    assert.equal(scaleDecision(input({ inFlight: 500 })).desired, 5, 'never past max')
    assert.equal(scaleDecision(input({ inFlight: 31, lastScaleUpAt: NOW - 1000 })).desired, 1, 'inside the up cooldown')
  })

  test('scales down one step at a time, on the recent peak, after the down cooldown', () => {
    const calm = { desired: 4, inFlight: 5, recentPeakInFlight: 12 }
    assert.equal(scaleDecision(input(calm)).desired, 3)
    assert.equal(scaleDecision(input({ ...calm, lastScaleDownAt: NOW - 10_000 })).desired, 4, 'inside the down cooldown')
    assert.equal(scaleDecision(input({ ...calm, lastScaleUpAt: NOW - 10_000 })).desired, 4, 'not right after scaling up')
    assert.equal(scaleDecision(input({ desired: 4, inFlight: 0, recentPeakInFlight: 35 })).desired, 4, 'a burst within the window keeps replicas')
    assert.equal(scaleDecision(input({ desired: 1, inFlight: 0, lastRequestAt: 0 })).desired, 1, 'never below min')
  })

  test('with min 0: to zero after the idle time, and back to one when a request waits', () => {
    const zeroable = { spec: { replicas: { min: 0, max: 3 } } }
    assert.equal(scaleDecision(input({ ...zeroable, lastRequestAt: NOW - 61_000 })).desired, 0, 'default autoscale settings apply')
    assert.equal(scaleDecision(input({ ...zeroable, lastRequestAt: NOW - 30_000 })).desired, 1, 'not idle long enough')
    assert.equal(scaleDecision(input({ ...zeroable, desired: 0, held: 1 })).desired, 1)
    assert.equal(scaleDecision(input({ ...zeroable, desired: 0, held: 0, inFlight: 0 })).desired, 0)
    assert.equal(scaleDecision(input({ ...zeroable, desired: 0, held: 25, inFlight: 0 })).desired, 3, 'a burst at zero wakes as many as it needs')
  })
})
