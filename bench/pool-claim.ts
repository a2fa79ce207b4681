/**
 * Warm-pool benchmark (prespawned kind), hello image, through the daemon's API:
 * the claim's API round trip (p50, p99), and start-to-serving for a pool claim
 * against a cold start (POST /v1/vms) in the same run, with their ratio.
 *   node dist/bench/pool-claim.js [--n 6]
 */
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import type { ClaimResult, PoolStatus } from '../src/core/pool.js'
import type { Vm } from '../src/core/vm.js'
import { DaemonProcess } from '../test/helpers/daemon-process.js'
import { createTestContext, exampleSpec, packageRoot } from '../test/helpers/fixtures.js'
import { untilServing } from './lib/measure.js'

const { values } = parseArgs({ options: { n: { type: 'string', default: '6' } } })
const n = Number(values.n)

function percentile (xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)] ?? NaN
}

const ctx = await createTestContext()
const daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: '10.244.0.0/24', UIGNITER_LOG_LEVEL: 'warn' })
try {
  await ctx.builder.build(JSON.parse(await readFile(exampleSpec('hello'), 'utf8')), join(packageRoot, 'examples/hello'))
  await daemon.start()
  await daemon.api.call('POST', '/v1/pools', { name: 'bench', image: 'hello', min: n, max: 2 * n + 2, onRelease: 'destroy', refillConcurrency: 2 })
  const waitFull = async (): Promise<void> => {
    for (;;) {
      const p = await daemon.api.call<PoolStatus>('GET', '/v1/pools/bench')
      if (p.ready >= n && p.creating === 0) return
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }
  await waitFull()

  const claimApi: number[] = []
  const claimServing: number[] = []
  for (let i = 0; i < n; i++) {
    const t0 = performance.now()
    const claim = await daemon.api.call<ClaimResult>('POST', '/v1/pools/bench/claim')
    claimApi.push(performance.now() - t0)
    await untilServing(claim.vm.ipAddress ?? '', 8080, 120_000)
    claimServing.push(performance.now() - t0)
    await daemon.api.call('POST', '/v1/pools/bench/release', { vm: claim.vm.id })
    await waitFull()
  }

  const cold: number[] = []
  for (let i = 0; i < n; i++) {
    const t0 = performance.now()
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'hello', name: `cold-${i}` })
    await untilServing(vm.ipAddress ?? '', 8080, 120_000)
    cold.push(performance.now() - t0)
    await daemon.api.call('DELETE', `/v1/vms/${vm.id}?force=true`)
  }

  const row = (label: string, xs: number[]): string => `${label.padEnd(38)} p50 ${percentile(xs, 50).toFixed(1).padStart(8)} ms   p99 ${percentile(xs, 99).toFixed(1).padStart(8)} ms`
  console.log(`hello image, prespawned pool, ${n} claims one after another (the pool refilled between them)\n`)
  console.log(row('claim: API round trip', claimApi))
  console.log(row('claim → app answers HTTP', claimServing))
  console.log(row('cold start (POST /v1/vms) → answers', cold))
  console.log(`\ncold / pool, start to serving (p50): ${(percentile(cold, 50) / percentile(claimServing, 50)).toFixed(2)}x`)
} finally {
  await daemon.api.call('DELETE', '/v1/pools/bench').catch(() => {})
  await daemon.stop()
  await daemon.removeNetwork()
  await ctx.cleanup()
}
