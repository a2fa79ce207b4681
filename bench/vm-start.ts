/**
 * VM start benchmark through the daemon: N VMs of the hello image started one
 * after another, then N at once. For each: the time from the API call to the
 * app answering HTTP on its bridge address (p50, p99), and the daemon's CPU
 * time and memory. The baseline, in the same run, is the same image booted
 * directly under QEMU without the daemon (user-mode network, port forward).
 *   node dist/bench/vm-start.js [--n 8]
 */
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { loadConfig } from '../src/core/config.js'
import { httpGetWithRetry } from '../src/core/app-probe.js'
import type { Vm } from '../src/core/vm.js'
import { BootedImage } from '../src/vmm/qemu/image-boot.js'
import { DaemonProcess } from '../test/helpers/daemon-process.js'
import { createTestContext, exampleSpec, packageRoot } from '../test/helpers/fixtures.js'
import { untilServing } from './lib/measure.js'

const { values } = parseArgs({ options: { n: { type: 'string', default: '8' } } })
const n = Number(values.n)

function percentile (xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)] ?? NaN
}

async function procStats (pid: number): Promise<{ cpuMs: number, rssMiB: number, peakMiB: number }> {
  const stat = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]?.split(' ') ?? []
  const ticks = Number(stat[11]) + Number(stat[12])
  const status = await readFile(`/proc/${pid}/status`, 'utf8')
  const kb = (key: string): number => Number(new RegExp(`${key}:\\s+(\\d+)`).exec(status)?.[1] ?? NaN)
  return { cpuMs: ticks * 10, rssMiB: kb('VmRSS') / 1024, peakMiB: kb('VmHWM') / 1024 }
}

const ctx = await createTestContext()
const daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: '10.248.0.0/24', UIGNITER_LOG_LEVEL: 'warn' })
try {
  const manifest = await ctx.builder.build(JSON.parse(await readFile(exampleSpec('hello'), 'utf8')), join(packageRoot, 'examples/hello'))

  const direct: number[] = []
  for (let i = 0; i < Math.min(n, 5); i++) {
    const t0 = performance.now()
    const booted = await BootedImage.start({ config: loadConfig(ctx.env), store: ctx.store, manifest, forwards: [{ hostPort: 0, guestPort: 8080 }] })
    await httpGetWithRetry(booted.forwards[0]?.hostPort ?? 0, '/', 60_000, 250)
    direct.push(performance.now() - t0)
    await booted.destroy()
  }

  await daemon.start()
  const pid = daemon.pid ?? 0
  const idle = await procStats(pid)

  const startOne = async (name: string): Promise<{ ms: number, id: string }> => {
    const t0 = performance.now()
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'hello', name })
    await untilServing(vm.ipAddress ?? '', 8080, 120_000)
    return { ms: performance.now() - t0, id: vm.id }
  }
  const removeAll = async (ids: string[]): Promise<void> => {
    await Promise.all(ids.map(async (id) => await daemon.api.call('DELETE', `/v1/vms/${id}?force=true`)))
  }

  const before1 = await procStats(pid)
  const sequential = []
  for (let i = 0; i < n; i++) sequential.push(await startOne(`seq-${i}`))
  const after1 = await procStats(pid)
  await removeAll(sequential.map((s) => s.id))

  const before2 = await procStats(pid)
  const concurrent = await Promise.all(Array.from({ length: n }, async (_, i) => await startOne(`par-${i}`)))
  const after2 = await procStats(pid)
  await removeAll(concurrent.map((s) => s.id))

  const row = (label: string, xs: number[]): string =>
    `${label.padEnd(34)} p50 ${percentile(xs, 50).toFixed(0).padStart(6)} ms   p99 ${percentile(xs, 99).toFixed(0).padStart(6)} ms   vs direct p50 ${(percentile(xs, 50) / percentile(direct, 50)).toFixed(2)}x`
  console.log(`hello image, ${n} VMs, accelerator from the daemon's probe; API call → app answers HTTP on its bridge address\n`)
  console.log(row(`direct QEMU boot (baseline, ${direct.length})`, direct))
  console.log(row(`daemon, ${n} one after another`, sequential.map((s) => s.ms)))
  console.log(row(`daemon, ${n} at once`, concurrent.map((s) => s.ms)))
  console.log(`\ndaemon CPU: ${(after1.cpuMs - before1.cpuMs).toFixed(0)} ms for ${n} sequential starts (${((after1.cpuMs - before1.cpuMs) / n).toFixed(0)} ms each), ${(after2.cpuMs - before2.cpuMs).toFixed(0)} ms for ${n} concurrent`)
  console.log(`daemon memory: RSS ${idle.rssMiB.toFixed(0)} MiB idle, ${after2.rssMiB.toFixed(0)} MiB after the runs, peak ${after2.peakMiB.toFixed(0)} MiB`)
} finally {
  await daemon.stop()
  await daemon.removeNetwork()
  await ctx.cleanup()
}
