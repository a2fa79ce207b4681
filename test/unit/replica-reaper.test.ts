import assert from 'node:assert/strict'
import { test } from 'node:test'
import { UigniterError } from '../../src/core/errors.js'
import { createLogger } from '../../src/core/logger.js'
import type { Vm } from '../../src/core/vm.js'
import { ReplicaReaper, type ReapableVms } from '../../src/service/replica-reaper.js'

/** VMs whose removal fails `failures` times (as a tap that will not go would), then succeeds. */
function flakyVms (failures: number): ReapableVms & { removals: number[], stops: number } {
  const vms = {
    removals: [] as number[],
    stops: 0,
    stop: async () => { vms.stops++; return await Promise.resolve({} as Vm) },
    remove: async () => {
      vms.removals.push(Date.now())
      if (vms.removals.length <= failures) return await Promise.reject(new UigniterError('UIG_ERR_INTERNAL', `removal ${vms.removals.length} failed`))
      return await Promise.resolve({} as Vm)
    }
  }
  return vms
}

const log = createLogger('silent')

test('a failed removal is told, and retried with a backoff until it takes', { timeout: 10_000 }, async () => {
  const vms = flakyVms(2)
  const reaper = new ReplicaReaper(vms, log, { baseRetryMs: 50, maxRetryMs: 1000 })
  const told: Array<[string, number, number]> = []
  await reaper.reap({ id: 'a', name: 'web-1' }, { graceMs: 100, onFailure: (err, attempt, retryInMs) => told.push([err.message, attempt, retryInMs]) })
  assert.equal(vms.stops, 1, 'stopped gracefully first')
  assert.equal(reaper.pending, 1)
  const deadline = Date.now() + 5000
  while (vms.removals.length < 3 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10))
  assert.equal(vms.removals.length, 3)
  assert.deepEqual(told, [['removal 1 failed', 1, 50], ['removal 2 failed', 2, 100]])
  assert.ok((vms.removals[2] ?? 0) - (vms.removals[1] ?? 0) >= 95, 'the second retry waited twice as long')
  assert.equal(reaper.pending, 0)
})

test('a VM that is already gone counts as removed; close() drops the retries', { timeout: 10_000 }, async () => {
  const gone: ReapableVms = {
    stop: async () => await Promise.reject(new UigniterError('UIG_ERR_VM_NOT_FOUND', 'no such VM')),
    remove: async () => await Promise.reject(new UigniterError('UIG_ERR_VM_NOT_FOUND', 'no such VM'))
  }
  const reaper = new ReplicaReaper(gone, log)
  let told = 0
  await reaper.reap({ id: 'b', name: 'web-2' }, { graceMs: 100, onFailure: () => { told++ } })
  assert.equal(told, 0)
  assert.equal(reaper.pending, 0)

  const stuck = new ReplicaReaper(flakyVms(Infinity), log, { baseRetryMs: 10_000 })
  await stuck.reap({ id: 'c', name: 'web-3' })
  assert.equal(stuck.pending, 1)
  stuck.close()
  assert.equal(stuck.pending, 0)
})
