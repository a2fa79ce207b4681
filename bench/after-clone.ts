/**
 * After-clone benchmark (issue 10): node-http clones, start-to-serving (API
 * call → GET http://<vm ip>:8080/ answers 200), with and without the
 * after-clone step, in one run through a real daemon on its own bridge:
 *   - `with`: a `ready: app` template with the image's hook (SIGUSR2,
 *     answered by the clone-safety preload once it rekeyed);
 *   - `without`: the same image, `afterClone: null`.
 * Clones alternate between the two, one at a time, each deleted before the
 * next, so both see the same host. Also the step itself as the daemon timed
 * it (startTimings.afterCloneMs: signal sent → the init reports the app's
 * ack). Target: the step costs under 5 ms p50.
 *   node dist/bench/after-clone.js [--n 10]
 * Progress goes to stderr, results (markdown) to stdout. `benchAfterClone`
 * runs it against a daemon someone else started, for a combined script.
 */
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'
import type { TemplateInfo } from '../src/core/template.js'
import type { Vm } from '../src/core/vm.js'
import type { ImageBuilder } from '../src/guest/image-builder.js'
import { DaemonProcess } from '../test/helpers/daemon-process.js'
import { createTestContext, exampleSpec, packageRoot } from '../test/helpers/fixtures.js'
import { percentile, untilServing } from './lib/measure.js'
import { stepMs } from '../src/core/start-steps.js'

export interface AfterCloneSeries { serve: number[], api: number[], step: number[] }
export interface AfterCloneResult { n: number, with: AfterCloneSeries, without: AfterCloneSeries, templateMs: { with: number, without: number }, markdown: string }

const began = performance.now()
const progress = (msg: string): void => { process.stderr.write(`[after-clone ${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${msg}\n`) }
const ms = (x: number): string => Number.isNaN(x) ? '—' : x < 100 ? x.toFixed(1) : x.toFixed(0)

/**
 * Builds node-http (unless the daemon has it), makes the two templates,
 * clones `n` of each, alternating, and removes what it made.
 */
export async function benchAfterClone (daemon: DaemonProcess, builder: ImageBuilder, n: number): Promise<AfterCloneResult> {
  const api = daemon.api
  await api.call('GET', '/v1/images/node-http').catch(async () => {
    progress('building node-http')
    await builder.build(JSON.parse(await readFile(exampleSpec('node-http'), 'utf8')), join(packageRoot, 'examples', 'node-http'))
  })
  const names = { with: 'bench-node-http-hook', without: 'bench-node-http-nohook' }
  const templateMs = { with: NaN, without: NaN }
  const series = { with: { serve: [], api: [], step: [] } as AfterCloneSeries, without: { serve: [], api: [], step: [] } as AfterCloneSeries }
  const made: string[] = []
  try {
    for (const kind of ['with', 'without'] as const) {
      const t0 = performance.now()
      const info = await api.call<TemplateInfo>('POST', '/v1/templates', { name: names[kind], image: 'node-http', ready: 'app', port: 8080, ...(kind === 'without' ? { afterClone: null } : {}) })
      made.push(info.name)
      templateMs[kind] = performance.now() - t0
      progress(`template ${info.name}: ${ms(templateMs[kind])} ms, hook ${JSON.stringify(info.afterClone)}`)
    }
    for (let i = 0; i < n; i++) {
      const order: Array<'with' | 'without'> = i % 2 === 0 ? ['with', 'without'] : ['without', 'with']
      for (const kind of order) {
        const t0 = performance.now()
        const vm = await api.call<Vm>('POST', '/v1/vms', { template: names[kind] })
        const apiMs = performance.now() - t0
        try {
          await untilServing(vm.ipAddress ?? '', 8080, 60_000)
          const serveMs = performance.now() - t0
          series[kind].serve.push(serveMs)
          series[kind].api.push(apiMs)
          const hookMs = stepMs(vm.startTimings, 'after-clone')
          if (hookMs !== undefined) series[kind].step.push(hookMs)
          progress(`${kind} hook ${i + 1}/${n}: serving after ${ms(serveMs)} ms (API ${ms(apiMs)} ms, step ${ms(hookMs ?? NaN)} ms)`)
        } finally {
          await api.call('DELETE', `/v1/vms/${vm.id}?force=true`)
        }
      }
    }
  } finally {
    for (const name of made) await api.call('DELETE', `/v1/templates/${name}`).catch((err: unknown) => progress(`deleting template ${name}: ${(err as Error).message}`))
  }
  const p = (xs: number[], q: number): string => ms(percentile(xs, q))
  const serveCost = percentile(series.with.serve, 50) - percentile(series.without.serve, 50)
  const stepP50 = percentile(series.with.step, 50)
  const lines = [
    `## node-http clones: the after-clone step (n = ${n} each, alternating, one at a time)\n`,
    '| template | start-to-serving p50 / p90 ms | API (create resolves) p50 / p90 ms | after-clone step p50 / p90 ms |',
    '|---|---:|---:|---:|',
    `| with the hook (SIGUSR2, acked) | ${p(series.with.serve, 50)} / ${p(series.with.serve, 90)} | ${p(series.with.api, 50)} / ${p(series.with.api, 90)} | ${p(series.with.step, 50)} / ${p(series.with.step, 90)} |`,
    `| without (afterClone: null) | ${p(series.without.serve, 50)} / ${p(series.without.serve, 90)} | ${p(series.without.api, 50)} / ${p(series.without.api, 90)} | — |`,
    '',
    `Start-to-serving p50, with − without: ${ms(serveCost)} ms (ratio ${(percentile(series.with.serve, 50) / percentile(series.without.serve, 50)).toFixed(3)}×). ` +
      `The step as timed in the create: ${ms(stepP50)} ms p50. Target < 5 ms p50: ${Number.isNaN(stepP50) ? 'not measured' : stepP50 < 5 ? 'met' : 'NOT met'}.`,
    `Templates made in ${ms(templateMs.with)} / ${ms(templateMs.without)} ms.`
  ]
  return { n, with: series.with, without: series.without, templateMs, markdown: lines.join('\n') }
}

/** The benchmark on its own: a data dir, a daemon on its own bridge, the run, the clean-up. */
export async function main (argv = process.argv.slice(2)): Promise<AfterCloneResult> {
  const { values } = parseArgs({ args: argv, options: { n: { type: 'string', default: '10' } } })
  const n = Number(values.n)
  if (!Number.isInteger(n) || n < 1) throw new Error(`--n takes a whole number ≥ 1, not "${values.n}"`)
  const ctx = await createTestContext()
  const daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.247.${Math.floor(Math.random() * 200)}.0/24`, UIGNITER_LOG_LEVEL: 'warn' })
  try {
    await daemon.start()
    const result = await benchAfterClone(daemon, ctx.builder, n)
    console.log(result.markdown)
    return result
  } finally {
    await daemon.removeEverything()
    await ctx.cleanup()
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) await main()
