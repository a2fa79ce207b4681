/**
 * OCI pull benchmark (issue 13, Benchmarks): two images of about 100 MB,
 * pushed to Debian's docker-registry on loopback: `busybox`, four layers
 * (busybox; Python's standard library; Perl's; the app), and `debian`, a
 * real Debian bookworm root made by debootstrap (minbase, python3,
 * redis-server; test/helpers/debian-image.ts, cached per machine) plus the
 * app's layer, serving with python3 -m http.server as www-data. Each is
 *  - pulled and converted with an empty blob cache (a fresh data dir), and
 *    again with every layer cached (the same data dir, the built image removed
 *    first): pull() and imageFromPull() timed apart, and the bytes fetched;
 *  - booted: the pulled image (as the daemon boots it, with its 256 MiB
 *    overlay, and without one) against the same root directory built with
 *    `--rootfs`, from QEMU's start to busybox httpd's first answer.
 * Medians of N runs; the ratios are against baselines of the same run. The
 * layers are real files of this machine, so they compress like real content.
 * Cold means an empty blob cache, not a cold page cache: the registry's files
 * stay in memory between runs.
 *   node dist/bench/oci-pull.js [--runs 3] [--images busybox,debian]
 */
import { mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises'
import { rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { askApp } from '../src/core/app-probe.js'
import { run } from '../src/core/exec.js'
import { freePort } from '../src/core/free-port.js'
import { formatImageRef, type ImageManifest } from '../src/core/image.js'
import { type Accel, USER_NETWORK } from '../src/core/ports/vmm-driver.js'
import { formatBytes } from '../src/core/progress.js'
import { BlobCache } from '../src/oci/blob-cache.js'
import { applyLayers } from '../src/oci/layer-apply.js'
import { pull, type PullResult } from '../src/oci/pull.js'
import { imageFromPull } from '../src/oci/pulled-image.js'
import { chooseAccel } from '../src/vmm/qemu/accel-probe.js'
import { QemuDriver } from '../src/vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../src/vmm/qemu/qemu-vm.js'
import { createTestContext, type TestContext } from '../test/helpers/fixtures.js'
import { closeDebianLayout, debianLayout, PYTHON_ENTRYPOINT, PYTHON_PORT, PYTHON_USER } from '../test/helpers/debian-image.js'
import { createLayout, pushImage, type OciLayout } from '../test/helpers/oci-images.js'
import { startRegistry, type TestRegistry } from '../test/helpers/oci-registry.js'
import { percentile } from './lib/measure.js'
import { Interrupt } from './lib/interrupt.js'

const APP_PORT = 8080
const APP = ['/bin/busybox', 'httpd', '-f', '-p', String(APP_PORT), '-h', '/www']
const BOOT_TIMEOUT_MS = 120_000

/** What each layer of the busybox image copies from this machine (path inside the image = path here), base first. */
const LAYERS: Array<{ what: string, paths: string[] }> = [
  { what: 'busybox', paths: ['/bin/busybox'] },
  { what: 'Python 3.11 standard library', paths: ['/usr/lib/python3.11'] },
  { what: 'Perl modules', paths: ['/usr/share/perl', '/usr/lib/x86_64-linux-gnu/perl'] },
  { what: 'the app (index.html)', paths: [] }
]

const { values } = parseArgs({ options: { runs: { type: 'string', default: '3' }, images: { type: 'string', default: 'busybox,debian' } } })
const runs = Number(values.runs)
if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs takes a whole number ≥ 1, not ${values.runs}`)
const imageKeys = values.images.split(',')
for (const key of imageKeys) if (key !== 'busybox' && key !== 'debian') throw new Error(`--images takes busybox and/or debian, not ${key}`)

const began = performance.now()
const progress = process.stderr.isTTY
  ? (m: string): void => { process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${m}\n`) }
  : (): void => {}

// ---------------------------------------------------------------- what must go, whatever happens

const tempDirs = new Set<string>()
const liveVms = new Set<QemuVm>()
process.on('exit', () => {
  for (const vm of liveVms) vm.kill()
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true })
})
const interrupt = new Interrupt(progress)

async function tempDir (prefix: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix))
  tempDirs.add(dir)
  return dir
}

async function removeTempDir (dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true })
  tempDirs.delete(dir)
}

// ---------------------------------------------------------------- the image

/** The layout's image `tag`: one umoci repack per layer, each copying its paths with cp -a (modes, symlinks, times kept). */
async function buildBenchImage (layout: OciLayout, tag: string): Promise<void> {
  const image = `${layout.dir}:${tag}`
  await run('umoci', ['new', '--image', image])
  const scratch = await tempDir('uigniter-bench-bundle-')
  const bundle = join(scratch, 'bundle')
  try {
    await run('umoci', ['unpack', '--rootless', '--image', image, bundle])
    const rootfs = join(bundle, 'rootfs')
    for (const layer of LAYERS) {
      interrupt.check()
      for (const path of layer.paths) {
        const parent = join(rootfs, path, '..')
        await mkdir(parent, { recursive: true })
        await run('cp', ['-a', path, parent])
      }
      if (layer.paths.length === 0) {
        await mkdir(join(rootfs, 'www'), { recursive: true })
        await writeFile(join(rootfs, 'www/index.html'), 'pulled and serving\n')
      }
      await run('umoci', ['repack', '--refresh-bundle', '--image', image, bundle])
    }
    await run('umoci', ['config', '--image', image, ...APP.flatMap((a) => ['--config.entrypoint', a]), '--config.exposedports', `${APP_PORT}/tcp`])
  } finally {
    await removeTempDir(scratch)
  }
}

// ---------------------------------------------------------------- pull and convert

interface PullSample {
  pullMs: number
  convertMs: number
  /** Layer and config bytes downloaded (manifests, a few KB, not counted). */
  bytesFetched: number
  fetched: number
  cached: number
  pulled: PullResult
  manifest: ImageManifest
}

async function pullAndConvert (ctx: TestContext, reference: string, registryHost: string, ociDataDir: string, name: string): Promise<PullSample> {
  const downloaded = new Map<string, number>()
  const t0 = performance.now()
  const pulled = await pull(reference, {
    dataDir: ociDataDir,
    insecure: [registryHost],
    onProgress: (p) => { if (p.state !== 'cached') downloaded.set(p.digest, p.received) }
  })
  const t1 = performance.now()
  const work = await ctx.store.createWorkDir()
  let manifest: ImageManifest
  try {
    manifest = await imageFromPull(pulled, { builder: ctx.builder, name, workParent: work })
  } finally {
    await ctx.store.discardWorkDir(work)
  }
  const t2 = performance.now()
  let bytesFetched = [...downloaded.values()].reduce((a, b) => a + b, 0)
  // The config is fetched without progress reports: whatever fetch the layers do not account for is the config's.
  if (pulled.stats.fetched > downloaded.size) bytesFetched += (await stat(new BlobCache(ociDataDir).path(pulled.configDigest))).size
  return { pullMs: t1 - t0, convertMs: t2 - t1, bytesFetched, fetched: pulled.stats.fetched, cached: pulled.stats.cached, pulled, manifest }
}

// ---------------------------------------------------------------- first boot

interface BootSample {
  /** driver.spawn's own time: the state dir, the overlay's mkfs.ext4 when there is one, QEMU's start and its monitor. */
  spawnMs: number
  appStartedMs: number
  servingMs: number
}

async function bootOnce (ctx: TestContext, driver: QemuDriver, accel: Accel, manifest: ImageManifest, overlay: boolean, id: string, appPort: number): Promise<BootSample> {
  interrupt.check()
  const port = await freePort()
  const stateDir = join(ctx.dataDir, 'run', id)
  const t0 = performance.now()
  const vm = await driver.spawn({
    id,
    stateDir,
    launch: {
      manifest,
      kernelPath: ctx.store.blobPath(manifest.kernel.blob.digest),
      ...(manifest.rootfs !== undefined ? { rootfsPath: ctx.store.blobPath(manifest.rootfs.digest) } : {}),
      accel,
      vcpus: manifest.vcpus,
      memoryMiB: manifest.memoryMiB,
      network: { mode: 'user', forwards: [{ hostAddress: '127.0.0.1', hostPort: port, guestPort: appPort }] },
      guestNetwork: USER_NETWORK,
      hostname: 'bench',
      ...(overlay && manifest.overlaySizeMiB !== undefined ? { overlaySizeMiB: manifest.overlaySizeMiB } : {})
    }
  })
  liveVms.add(vm)
  const spawnMs = performance.now() - t0
  let ended = false
  vm.exited.then(() => { ended = true }, () => { ended = true })
  try {
    await vm.waitForMarker('app-started', BOOT_TIMEOUT_MS)
    const appStartedMs = performance.now() - t0
    // From app-started on, one attempt at a time: a connection through the user-mode forward made
    // before the guest's network is up can stall for seconds on slirp's own SYN retries.
    const stopAt = performance.now() + BOOT_TIMEOUT_MS
    for (;;) {
      const answer = await askApp({ host: '127.0.0.1', port, httpPath: '/' }, { connectMs: 1000, answerMs: 1000 })
      if (answer?.status === 200) return { spawnMs, appStartedMs, servingMs: performance.now() - t0 }
      if (ended) throw new Error(`${manifest.name} ended before it answered GET /`)
      if (performance.now() > stopAt) throw new Error(`${manifest.name} did not answer GET / within ${BOOT_TIMEOUT_MS / 1000} s of its start`)
      await new Promise((resolve) => setTimeout(resolve, 5))
    }
  } finally {
    vm.kill()
    await vm.exited
    liveVms.delete(vm)
    await driver.remove(stateDir).catch((err: unknown) => { progress(`cannot remove ${stateDir}: ${String(err)}`) })
  }
}

// ---------------------------------------------------------------- output

const ms = (x: number): string => Number.isNaN(x) ? '—' : x.toFixed(0)
const ratio = (a: number, b: number): string => `${(a / b).toFixed(2)}×`
const p50 = (xs: number[]): number => percentile(xs, 50)

interface PullRow { pullMs: number, convertMs: number, totalMs: number, bytesFetched: number, fetched: number, cached: number }

function pullRow (samples: PullSample[]): PullRow {
  return {
    pullMs: p50(samples.map((s) => s.pullMs)),
    convertMs: p50(samples.map((s) => s.convertMs)),
    totalMs: p50(samples.map((s) => s.pullMs + s.convertMs)),
    bytesFetched: p50(samples.map((s) => s.bytesFetched)),
    fetched: p50(samples.map((s) => s.fetched)),
    cached: p50(samples.map((s) => s.cached))
  }
}

// ---------------------------------------------------------------- the images

interface BenchImage {
  key: string
  /** repository:tag in the registry. */
  pushedAs: string
  pulledName: string
  /** What each layer holds, base first. */
  layers: string[]
  appPort: number
  /** Pushes the image to the registry. */
  push: (registryHost: string) => Promise<void>
  /** The build spec source and fields of the same app as an `image build --rootfs` of the applied root. */
  rootfsBuild: (root: string) => Record<string, unknown>
}

let busyboxLayout: OciLayout | undefined

const benchImages: Record<string, BenchImage> = {
  busybox: {
    key: 'busybox',
    pushedAs: 'bench/oci-pull:1',
    pulledName: 'oci-pull:1',
    layers: LAYERS.map((l) => l.what),
    appPort: APP_PORT,
    push: async (registryHost) => {
      busyboxLayout = await createLayout()
      tempDirs.add(join(busyboxLayout.dir, '..'))
      progress('building the busybox image with umoci (4 layers)')
      await buildBenchImage(busyboxLayout, 'v1')
      progress(`pushing it to ${registryHost} with skopeo`)
      await pushImage(busyboxLayout, 'v1', registryHost, 'bench/oci-pull:1')
    },
    // As `image build --rootfs DIR --entrypoint /bin/busybox -- httpd ...` would.
    rootfsBuild: (root) => {
      const [entrypoint = '', ...args] = APP
      return { name: 'oci-rootfs:1', source: { kind: 'rootfs', dir: root, entrypoint, args } }
    }
  },
  debian: {
    key: 'debian',
    pushedAs: 'bench/debian-python:bookworm',
    pulledName: 'debian-python:bookworm',
    layers: ['Debian bookworm: debootstrap minbase + python3 + redis-server, docs and apt lists pruned', 'the app (/srv/www/index.html, owned by www-data)'],
    appPort: PYTHON_PORT,
    push: async (registryHost) => {
      progress('making the Debian image with umoci (the root: debootstrap, once per machine)')
      const layout = await debianLayout()
      tempDirs.add(join(layout.dir, '..'))
      progress(`pushing it to ${registryHost} with skopeo`)
      await pushImage(layout, 'python', registryHost, 'bench/debian-python:bookworm')
    },
    // The image's config as flags: entrypoint and cmd, its working dir, www-data, the PATH python3 is found by.
    rootfsBuild: (root) => {
      const [entrypoint = '', ...args] = PYTHON_ENTRYPOINT
      return {
        name: 'debian-rootfs:1',
        source: { kind: 'rootfs', dir: root, entrypoint, args: [...args, 'python3', '-m', 'http.server', String(PYTHON_PORT)] },
        workdir: '/srv/www',
        user: { uid: PYTHON_USER.uid, gid: PYTHON_USER.gid },
        env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' }
      }
    }
  }
}

// ---------------------------------------------------------------- one image's run

async function benchImage (ctx: TestContext, registryHost: string, image: BenchImage): Promise<string[]> {
  await image.push(registryHost)
  const reference = `${registryHost}/${image.pushedAs}`
  const pulledName = image.pulledName

  const cold: PullSample[] = []
  let ociDataDir = ''
  for (let i = 1; i <= runs; i++) {
    interrupt.check()
    if (ociDataDir !== '') await removeTempDir(ociDataDir)
    ociDataDir = await tempDir('uigniter-bench-oci-')
    await ctx.store.remove(pulledName).catch(() => {})
    const s = await pullAndConvert(ctx, reference, registryHost, ociDataDir, pulledName)
    cold.push(s)
    progress(`${image.key} cold ${i}/${runs}: pull ${ms(s.pullMs)} ms, convert ${ms(s.convertMs)} ms, ${formatBytes(s.bytesFetched)} fetched`)
  }
  const cached: PullSample[] = []
  for (let i = 1; i <= runs; i++) {
    interrupt.check()
    await ctx.store.remove(pulledName)
    const s = await pullAndConvert(ctx, reference, registryHost, ociDataDir, pulledName)
    cached.push(s)
    progress(`${image.key} cached ${i}/${runs}: pull ${ms(s.pullMs)} ms, convert ${ms(s.convertMs)} ms, ${formatBytes(s.bytesFetched)} fetched`)
  }
  const last = cached[cached.length - 1] as PullSample
  const pulled = last.manifest

  // The same root, applied from the same cached layers, built as `image build --rootfs` would build it.
  progress(`${image.key}: building the same root with --rootfs`)
  const work = await ctx.store.createWorkDir()
  let rootfsImage: ImageManifest
  let rootBytes: number
  let rootFiles: number
  try {
    const root = join(work, 'root')
    const applied = await applyLayers(last.pulled.layers.map((l) => ({ path: l.path, mediaType: l.mediaType, digest: l.digest })), root)
    rootBytes = applied.bytes
    rootFiles = applied.files
    rootfsImage = await ctx.builder.build(image.rootfsBuild(root), work)
  } finally {
    await ctx.store.discardWorkDir(work)
    // The layers were applied from this cache; the next image gets a cache of its own.
    await removeTempDir(ociDataDir)
  }

  const accel = (await chooseAccel(ctx.config, ctx.store.blobPath(pulled.kernel.blob.digest), pulled.kernel.blob.digest)).accel
  const variants: Array<{ name: string, manifest: ImageManifest, overlay: boolean }> = [
    { name: '`--rootfs` (baseline)', manifest: rootfsImage, overlay: false },
    { name: `pulled, with its ${pulled.overlaySizeMiB ?? 0} MiB overlay (as the daemon boots it)`, manifest: pulled, overlay: true },
    { name: 'pulled, no overlay', manifest: pulled, overlay: false }
  ]
  progress(`${image.key}: booting (${accel}): one unmeasured boot, then ${runs} of each, interleaved`)
  await bootOnce(ctx, driver, accel, rootfsImage, false, `oci-bench-${process.pid}-${image.key}-warm`, image.appPort)
  const boots = variants.map(() => [] as BootSample[])
  for (let i = 1; i <= runs; i++) {
    for (const [v, variant] of variants.entries()) {
      const s = await bootOnce(ctx, driver, accel, variant.manifest, variant.overlay, `oci-bench-${process.pid}-${image.key}-${v}-${i}`, image.appPort)
      boots[v]?.push(s)
      progress(`${image.key} boot ${i}/${runs} ${variant.name}: spawn ${ms(s.spawnMs)}, app started ${ms(s.appStartedMs)}, serving ${ms(s.servingMs)} ms`)
    }
  }
  // Both images of this one go before the next image's are made: the store holds one image's roots at a time.
  await ctx.store.remove(pulledName).catch(() => {})
  await ctx.store.remove(formatImageRef(rootfsImage)).catch(() => {})

  // ------------------------------------------------------------ the figures
  const layers = last.pulled.layers
  const compressed = layers.reduce((a, l) => a + l.size, 0)
  const c = pullRow(cold)
  const w = pullRow(cached)
  const out = [
    `## ${image.key}`,
    '',
    `### OCI pull and convert: ${layers.length} layers, ${formatBytes(compressed)} compressed (gzip), ${formatBytes(rootBytes)} in ${rootFiles} files applied; docker-registry on loopback; ${runs} runs each (median)`,
    '',
    '| layer | content | compressed |',
    '|---|---|---:|',
    ...layers.map((l, i) => `| ${i} ${l.digest.slice(7, 19)} | ${image.layers[i] ?? '?'} | ${formatBytes(l.size)} |`),
    '',
    '| blob cache | pull() ms | imageFromPull() ms | sum ms | bytes fetched | blobs fetched / cached |',
    '|---|---:|---:|---:|---:|---:|',
    `| empty (fresh data dir) | ${ms(c.pullMs)} | ${ms(c.convertMs)} | ${ms(c.totalMs)} | ${formatBytes(c.bytesFetched)} | ${c.fetched} / ${c.cached} |`,
    `| every layer cached (image removed first) | ${ms(w.pullMs)} | ${ms(w.convertMs)} | ${ms(w.totalMs)} | ${formatBytes(w.bytesFetched)} | ${w.fetched} / ${w.cached} |`,
    `| cached / cold | ${ratio(w.pullMs, c.pullMs)} | ${ratio(w.convertMs, c.convertMs)} | ${ratio(w.totalMs, c.totalMs)} | | |`,
    '',
    `imageFromPull() applies the layers, maps the config and builds the ${pulled.format} root (${formatBytes(pulled.rootfs?.size ?? 0)}); the sum is the median of each run's sum.`,
    '',
    `### First boot: pulled image against the same root built with --rootfs; ${accel}; ${runs} boots each, interleaved, after one unmeasured boot (median)`,
    '',
    '| image | spawn ms | QEMU start → app started ms | QEMU start → first HTTP answer ms | vs --rootfs |',
    '|---|---:|---:|---:|---:|'
  ]
  const base = p50((boots[0] ?? []).map((s) => s.servingMs))
  for (const [v, variant] of variants.entries()) {
    const samples = boots[v] ?? []
    const serving = p50(samples.map((s) => s.servingMs))
    out.push(`| ${variant.name} | ${ms(p50(samples.map((s) => s.spawnMs)))} | ${ms(p50(samples.map((s) => s.appStartedMs)))} | ${ms(serving)} | ${ratio(serving, base)} |`)
  }
  out.push('')
  return out
}

// ---------------------------------------------------------------- the run

let registry: TestRegistry | undefined
const ctx = await createTestContext()
tempDirs.add(ctx.dataDir)
const driver = new QemuDriver({ livenessPollMs: 1000 })
try {
  registry = await startRegistry()
  const out: string[] = []
  for (const key of imageKeys) {
    const image = benchImages[key]
    if (image !== undefined) out.push(...await benchImage(ctx, registry.host, image))
  }
  out.push('spawn: from the spawn call until QEMU runs and its monitor answers (it makes the overlay with mkfs.ext4 first); every time is from the spawn call.')
  process.stdout.write(out.join('\n') + '\n')
} catch (err) {
  if (!interrupt.interrupted) throw err
  process.stderr.write('interrupted before the figures: removing what it started\n')
  process.exitCode = 130
} finally {
  for (const vm of liveVms) vm.kill()
  await busyboxLayout?.close()
  await closeDebianLayout()
  await registry?.close()
  await ctx.cleanup()
  for (const dir of [...tempDirs]) await removeTempDir(dir)
}
