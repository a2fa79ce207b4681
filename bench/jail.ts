/**
 * Jail benchmark (issue 10, part 2), through the QEMU driver, in one run:
 *   - cold boot start-to-serving (driver.start → the probe app answers on its
 *     forwarded port), jailed and unjailed, alternated, p50 and the ratio;
 *   - clone start-to-serving (Template.clone → answering), jailed and
 *     unjailed, from one template, p50 and the difference in ms;
 *   - host CPU per idle VM over a window, jailed and unjailed;
 *   - QEMU's memory beyond guest RAM: the cgroup's peak charge for a booted
 *     VM, a clone, and a guest that touches all its RAM.
 * Targets: the jail adds under 5 % to a cold boot and under 10 ms to a
 * clone; idle CPU unchanged. Progress goes to stderr, results (markdown) to
 * stdout. Needs root.
 *   node dist/bench/jail.js [--n 5] [--idle-vms 3] [--idle-s 20] [--parts cold,clone,idle,memory]
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'
import { waitForAppAnswer } from '../src/core/app-probe.js'
import type { ImageManifest } from '../src/core/image.js'
import { Template } from '../src/snapshot/template.js'
import { chooseAccel } from '../src/vmm/qemu/accel-probe.js'
import { freePort } from '../src/core/free-port.js'
import { DEFAULT_JAIL } from '../src/vmm/qemu/jail.js'
import { QemuDriver } from '../src/vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../src/vmm/qemu/qemu-vm.js'
import { VmStateDir } from '../src/vmm/qemu/vm-state-dir.js'
import { createTestContext } from '../test/helpers/fixtures.js'
import { makeProbeRootfs } from '../test/vmm/probe-app.js'
import { cpuTicks, percentile } from './lib/measure.js'
import { type Accel, type GuestLaunch, USER_NETWORK } from '../src/core/ports/vmm-driver.js'

export interface JailBenchOptions {
  /** Samples per start path and mode (default 5). */
  n?: number
  /** Idle VMs of each mode for the CPU window (default 3). */
  idleVms?: number
  idleS?: number
  /** Which parts to run (default all). */
  parts?: Array<'cold' | 'clone' | 'idle' | 'memory'>
  progress?: (message: string) => void
}

const MODES = ['unjailed', 'jailed'] as const
type Mode = typeof MODES[number]
const MEMORY_MIB = 64
const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))
const ms = (x: number): string => Number.isNaN(x) ? '—' : x < 100 ? x.toFixed(1) : x.toFixed(0)

/** Probes 127.0.0.1:PORT every 5 ms until the probe app answers "probe". */
async function untilProbe (port: number, timeoutMs: number): Promise<void> {
  const answer = await waitForAppAnswer({ host: '127.0.0.1', port, speaksFirst: true }, timeoutMs, undefined,
    { intervalMs: 5, attempt: { connectMs: 2000, answerMs: 2000 } })
  if (!answer.body.startsWith('probe')) throw new Error(`127.0.0.1:${port} answered ${JSON.stringify(answer.body.slice(0, 80))}, not the probe app`)
}

/**
 * Runs the benchmark and returns its markdown report; the lead can combine
 * it with another benchmark in one script.
 */
export async function runJailBench (options: JailBenchOptions = {}): Promise<string> {
  const n = options.n ?? 5
  const idleVms = options.idleVms ?? 3
  const idleS = options.idleS ?? 20
  const parts = new Set(options.parts ?? ['cold', 'clone', 'idle', 'memory'])
  const began = performance.now()
  const progress = options.progress ?? ((m: string) => { process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${m}\n`) })
  if (process.getuid?.() !== 0) throw new Error('the jail benchmark needs root (the jail does)')

  const ctx = await createTestContext()
  const scratch = await mkdtemp(join(tmpdir(), 'uigniter-bench-jail-'))
  const stops = { guestMarginMs: 2000, quitMs: 2000, termMs: 2000, killMs: 3000 }
  // Its own uid range: a daemon running beside the benchmark keeps its own.
  const jail = { ...DEFAULT_JAIL, uidBase: 800_000, uidCount: 1000, gid: 800_000 }
  const drivers: Record<Mode, QemuDriver> = {
    unjailed: new QemuDriver({ livenessPollMs: 1000, stopTimeouts: stops }),
    jailed: new QemuDriver({ livenessPollMs: 1000, stopTimeouts: stops, jail })
  }
  const live = new Set<QemuVm>()
  let seq = 0
  let image: ImageManifest
  let accel: Accel
  const launch = (port: number, args: string[] = ['serve'], memoryMiB = MEMORY_MIB): GuestLaunch => ({
    manifest: image,
    kernelPath: ctx.store.blobPath(image.kernel.blob.digest),
    rootfsPath: ctx.store.blobPath(image.rootfs?.digest ?? ''),
    accel,
    vcpus: 1,
    memoryMiB,
    network: { mode: 'user', forwards: [{ hostAddress: '127.0.0.1', hostPort: port, guestPort: 8080 }] },
    guestNetwork: USER_NETWORK,
    hostname: 'probe',
    appArgs: args
  })
  const end = async (vm: QemuVm): Promise<void> => {
    vm.kill()
    await vm.exited
    live.delete(vm)
  }

  try {
    const rootfs = await makeProbeRootfs(scratch)
    image = await ctx.builder.build({ name: 'probe', source: { kind: 'rootfs', dir: rootfs, entrypoint: '/bin/probe', args: ['serve'] }, format: 'squashfs' })
    accel = (await chooseAccel(ctx.config, ctx.store.blobPath(image.kernel.blob.digest), image.kernel.blob.digest)).accel
    progress(`accelerator ${accel}`)

    const cold: Record<Mode, number[]> = { unjailed: [], jailed: [] }
    const clone: Record<Mode, number[]> = { unjailed: [], jailed: [] }
    const peaks: Record<'booted' | 'clone' | 'all-ram', number[]> = { booted: [], clone: [], 'all-ram': [] }

    // Cold boots, the two modes alternated so that drift on the host hits both alike.
    for (let i = 0; i < (parts.has('cold') ? n : 0); i++) {
      for (const mode of i % 2 === 0 ? MODES : [...MODES].reverse()) {
        const port = await freePort()
        const id = `cold-${mode}-${++seq}`
        const t0 = performance.now()
        const vm = await drivers[mode].spawn({ id, stateDir: VmStateDir.of(ctx.dataDir, id).dir, launch: launch(port) })
        live.add(vm)
        await untilProbe(port, 120_000)
        cold[mode].push(performance.now() - t0)
        const peak = await vm.cgroup?.peakMemoryBytes()
        if (peak !== undefined) peaks.booted.push(peak / 1048576 - MEMORY_MIB)
        progress(`cold ${mode} ${i + 1}/${n}: ${ms(performance.now() - t0)} ms`)
        await end(vm)
      }
    }

    // Clones of one template (made jailed: its state goes out over the chroot's socket).
    const templateLaunch: GuestLaunch = { ...launch(0), network: { mode: 'user', forwards: [] } }
    const template = await Template.create(drivers.jailed, { id: 'bench-jail', dataDir: ctx.dataDir, launch: templateLaunch })
    progress(`template made in ${template.record.timings.bootMs + template.record.timings.saveMs} ms`)
    for (let i = 0; i < (parts.has('clone') ? n : 0); i++) {
      for (const mode of i % 2 === 0 ? MODES : [...MODES].reverse()) {
        const port = await freePort()
        const id = `clone-${mode}-${++seq}`
        const t0 = performance.now()
        const { vm } = await template.clone(drivers[mode], {
          id,
          stateDir: VmStateDir.of(ctx.dataDir, id).dir,
          network: { mode: 'user', forwards: [{ hostAddress: '127.0.0.1', hostPort: port, guestPort: 8080 }] },
          guestNetwork: { ...USER_NETWORK, address: '10.0.2.16' },
          hostname: id
        })
        live.add(vm)
        await untilProbe(port, 60_000)
        clone[mode].push(performance.now() - t0)
        const peak = await vm.cgroup?.peakMemoryBytes()
        if (peak !== undefined) peaks.clone.push(peak / 1048576 - MEMORY_MIB)
        progress(`clone ${mode} ${i + 1}/${n}: ${ms(performance.now() - t0)} ms`)
        await end(vm)
      }
    }

    // Idle CPU: idleVms of each mode at once, after they settle.
    const idle: Record<Mode, QemuVm[]> = { unjailed: [], jailed: [] }
    for (const mode of parts.has('idle') ? MODES : []) {
      for (let i = 0; i < idleVms; i++) {
        const port = await freePort()
        const id = `idle-${mode}-${++seq}`
        const vm = await drivers[mode].spawn({ id, stateDir: VmStateDir.of(ctx.dataDir, id).dir, launch: launch(port) })
        live.add(vm)
        idle[mode].push(vm)
        await untilProbe(port, 120_000)
      }
    }
    if (parts.has('idle')) progress(`${2 * idleVms} idle VMs up; settling 5 s, then a ${idleS} s window`)
    await sleep(parts.has('idle') ? 5000 : 0)
    const before = new Map<QemuVm, number>()
    for (const vm of [...idle.unjailed, ...idle.jailed]) before.set(vm, await cpuTicks(vm.pid))
    const t0 = performance.now()
    await sleep(parts.has('idle') ? idleS * 1000 : 0)
    const windowS = (performance.now() - t0) / 1000
    const idleCpu: Record<Mode, number[]> = { unjailed: [], jailed: [] }
    for (const mode of MODES) {
      for (const vm of idle[mode]) idleCpu[mode].push(((await cpuTicks(vm.pid)) - (before.get(vm) ?? 0)) / 100 / windowS * 100)
    }
    for (const vm of [...idle.unjailed, ...idle.jailed]) await end(vm)

    // QEMU's own memory: a guest that touches (nearly) all of its RAM, under a roomy limit.
    if (parts.has('memory')) {
      const port = await freePort()
      const id = `allram-${++seq}`
      const roomy = new QemuDriver({ livenessPollMs: 1000, stopTimeouts: stops, jail: { ...jail, memoryOverheadMiB: 512 } })
      const vm = await roomy.spawn({ id, stateDir: VmStateDir.of(ctx.dataDir, id).dir, launch: launch(port, ['eat', '112'], 160) })
      live.add(vm)
      await untilProbe(port, 180_000)
      const peak = await vm.cgroup?.peakMemoryBytes()
      if (peak !== undefined) peaks['all-ram'].push(peak / 1048576 - 160)
      await end(vm)
    }
    await template.remove()

    const p50 = (xs: number[]): number => percentile(xs, 50)
    const mean = (xs: number[]): number => xs.reduce((s, x) => s + x, 0) / xs.length
    const lines = [
      `## Jail: start-to-serving, jailed vs unjailed (probe app, TCG, ${MEMORY_MIB} MiB, n=${n} each, alternated)`,
      '',
      '| path | unjailed p50 ms | jailed p50 ms | jailed / unjailed | jailed − unjailed ms | target |',
      '|---|---|---|---|---|---|',
      `| cold boot | ${ms(p50(cold.unjailed))} | ${ms(p50(cold.jailed))} | ${(p50(cold.jailed) / p50(cold.unjailed)).toFixed(3)} | ${ms(p50(cold.jailed) - p50(cold.unjailed))} | < 1.05 |`,
      `| clone | ${ms(p50(clone.unjailed))} | ${ms(p50(clone.jailed))} | ${(p50(clone.jailed) / p50(clone.unjailed)).toFixed(3)} | ${ms(p50(clone.jailed) - p50(clone.unjailed))} | < 10 ms |`,
      '',
      `## Jail: idle host CPU per VM (${idleVms} of each at once, ${windowS.toFixed(0)} s window)`,
      '',
      '| mode | mean % of a core per VM |',
      '|---|---|',
      ...MODES.map((mode) => `| ${mode} | ${mean(idleCpu[mode]).toFixed(2)} |`),
      `| jailed / unjailed | ${(mean(idleCpu.jailed) / mean(idleCpu.unjailed)).toFixed(2)} |`,
      '',
      '## Jail: QEMU\'s memory beyond guest RAM (cgroup peak charge − guest RAM, MiB)',
      '',
      '| VM | max | p50 |',
      '|---|---|---|',
      `| booted, ${MEMORY_MIB} MiB guest (touches part of its RAM) | ${ms(Math.max(...peaks.booted))} | ${ms(p50(peaks.booted))} |`,
      `| clone, ${MEMORY_MIB} MiB guest | ${ms(Math.max(...peaks.clone))} | ${ms(p50(peaks.clone))} |`,
      `| booted, 160 MiB guest whose app touches 112 MiB | ${ms(Math.max(...peaks['all-ram']))} | ${ms(p50(peaks['all-ram']))} |`,
      '',
      `jail.memoryOverheadMiB default: ${DEFAULT_JAIL.memoryOverheadMiB} MiB. Raw samples (ms): cold ${JSON.stringify({ unjailed: cold.unjailed.map(Math.round), jailed: cold.jailed.map(Math.round) })}, clone ${JSON.stringify({ unjailed: clone.unjailed.map(Math.round), jailed: clone.jailed.map(Math.round) })}`
    ]
    return lines.join('\n') + '\n'
  } finally {
    for (const vm of live) vm.kill()
    await Promise.all([...live].map(async (vm) => await Promise.race([vm.exited, sleep(3000)])))
    await ctx.cleanup()
    await rm(scratch, { recursive: true, force: true })
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const { values } = parseArgs({ options: { n: { type: 'string', default: '5' }, 'idle-vms': { type: 'string', default: '3' }, 'idle-s': { type: 'string', default: '20' }, parts: { type: 'string', default: 'cold,clone,idle,memory' } } })
  const parts = values.parts.split(',') as NonNullable<JailBenchOptions['parts']>
  process.stdout.write(await runJailBench({ n: Number(values.n), idleVms: Number(values['idle-vms']), idleS: Number(values['idle-s']), parts }))
}
