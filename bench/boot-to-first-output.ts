/**
 * Boot benchmark: for the hello, node-http and memcached images, the time
 * from QEMU's start to the app's first console output (median of N boots, one
 * after another), with the image sizes and ratios against hello, the
 * baseline taken in the same run.
 *   node dist/bench/boot-to-first-output.js [--runs 5]
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { loadConfig } from '../src/core/config.js'
import type { ImageManifest } from '../src/core/image.js'
import { packageRoot } from '../src/core/package-paths.js'
import { formatBytes } from '../src/core/progress.js'
import { ImageBuilder } from '../src/guest/image-builder.js'
import { ImageStore } from '../src/guest/image-store.js'
import { createKernelSource } from '../src/guest/guest-kernel.js'
import { BootedImage } from '../src/vmm/qemu/image-boot.js'

const { values } = parseArgs({ options: { runs: { type: 'string', default: '5' } } })
const runs = Number(values.runs)

const dataDir = await mkdtemp(join(tmpdir(), 'uigniter-bench-'))
const config = loadConfig({ ...process.env, UIGNITER_DATA_DIR: dataDir })
const store = new ImageStore(dataDir)
const kernels = createKernelSource(config)
const builder = new ImageBuilder(store, kernels)

const spec = async (name: string): Promise<Record<string, unknown>> =>
  JSON.parse(await readFile(join(packageRoot, 'examples', name, 'image.json'), 'utf8')) as Record<string, unknown>

function median (xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const mid = Math.floor(s.length / 2)
  return s.length % 2 === 1 ? s[mid] ?? NaN : ((s[mid - 1] ?? NaN) + (s[mid] ?? NaN)) / 2
}

/** One boot: QEMU start → init → app exec → the app's first console line. */
async function bootOnce (manifest: ImageManifest): Promise<{ init: number, exec: number, firstOutput: number }> {
  const booted = await BootedImage.start({ config, store, manifest })
  const lines: string[] = []
  booted.on('line', (l: string) => lines.push(l))
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${manifest.name}: no output within 120 s`)), 120_000)
      booted.on('line', () => { if (booted.timings.firstOutputAt !== undefined) { clearTimeout(timer); resolve() } })
      booted.exited.then((e) => { clearTimeout(timer); reject(new Error(`${manifest.name} ended before printing: ${e.reason}: ${e.detail}; console: ${lines.slice(-5).join(' | ')}`)) }, reject)
    })
    const t = booted.timings
    return { init: (t.initAt ?? NaN) - t.spawnedAt, exec: (t.appStartedAt ?? NaN) - t.spawnedAt, firstOutput: (t.firstOutputAt ?? NaN) - t.spawnedAt }
  } finally {
    await booted.destroy()
  }
}

try {
  const kernel = await kernels.get()
  const memcachedSpec = await spec('memcached')
  // -vv makes memcached print its slab classes at start, so that it has a first output to time.
  memcachedSpec.source = { kind: 'elf', path: '/usr/bin/memcached', args: ['-u', 'root', '-p', '11211', '-U', '0', '-m', '64', '-vv'] }
  const images = [
    await builder.build(await spec('hello'), join(packageRoot, 'examples/hello')),
    await builder.build(await spec('node-http'), join(packageRoot, 'examples/node-http')),
    await builder.build(memcachedSpec, join(packageRoot, 'examples/memcached'))
  ]
  const first = await BootedImage.start({ config, store, manifest: images[0]! })
  const accel = first.accel
  await first.destroy()
  console.log(`guest kernel ${kernel.key} (${kernel.source}): ${formatBytes(kernel.size)}${kernel.source === 'build' ? `, built in ${kernel.buildSeconds} s` : `, ${kernel.modules.length} modules`}`)
  console.log(`accelerator: ${accel.accel} (${accel.reason}); ${runs} boots per image, one after another\n`)
  const rows: Array<{ name: string, format: string, size: number, init: number, exec: number, out: number }> = []
  for (const m of images) {
    const samples = []
    for (let i = 0; i < runs; i++) samples.push(await bootOnce(m))
    rows.push({
      name: m.name, format: m.format, size: m.rootfs?.size ?? 0,
      init: median(samples.map((s) => s.init)), exec: median(samples.map((s) => s.exec)), out: median(samples.map((s) => s.firstOutput))
    })
  }
  const base = rows[0]?.out ?? NaN
  console.log('image      format     rootfs     init(ms)  app exec(ms)  first output(ms)  vs hello')
  for (const r of rows) {
    console.log(`${r.name.padEnd(10)} ${r.format.padEnd(10)} ${formatBytes(r.size).padEnd(10)} ${r.init.toFixed(0).padStart(8)}  ${r.exec.toFixed(0).padStart(12)}  ${r.out.toFixed(0).padStart(16)}  ${(r.out / base).toFixed(2)}x`)
  }
} finally {
  await rm(dataDir, { recursive: true, force: true })
}
