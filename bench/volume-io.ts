/**
 * Volume I/O benchmark (issue 13, Benchmarks): write and fsync throughput
 * inside a VM on a persistent volume, against the same commands on the host
 * in the directory that holds the volume files (the same filesystem, the
 * same disk). Through a real daemon: POST /v1/volumes, then POST /v1/vms
 * with the volume on /data and a shell script as the app; the VM runs the
 * script and ends, and its figures are read from its console log.
 *
 * The guest is the Debian bookworm root of test/helpers/debian-image.ts
 * (coreutils dd), built with `--rootfs` as root's image with a /data of its
 * own: the registry's python image has no /data (the mount point must exist
 * on a root without an overlay) and runs as www-data, and a root app keeps
 * the script free of the volume's owners (docs/volumes.md "Owners").
 *
 * Each run, guest then host (one VM at a time, a fresh volume each run):
 *  - seq-write: dd bs=1M count=N oflag=direct conv=fdatasync: O_DIRECT
 *    writes, then one fdatasync, so that both figures include reaching the
 *    host's disk (in the guest the flush becomes an fdatasync of the volume
 *    file; without it the guest figure would only measure QEMU's writeback
 *    cache, the host's page cache);
 *  - seq-read: dd bs=1M iflag=direct of that file; the guest's read may be
 *    served from the host's page cache (QEMU opens the volume with the
 *    writeback cache), the host's is not;
 *  - dsync: dd bs=4k count=M oflag=dsync: each 4 KiB write waits for its
 *    flush, so writes/s is fsyncs/s (a guest fsync is an fdatasync on the
 *    host: docs/volumes.md "Durability").
 * And on the host each run, fio as a cross-check of dd: the same sizes,
 * direct=1 end_fsync=1, and sync=dsync, growing the file as dd does.
 *   node dist/bench/volume-io.js [--runs 3] [--seq-mib 256] [--sync-writes 2000]
 */
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises'
import { rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { parseArgs } from 'node:util'
import { run } from '../src/core/exec.js'
import type { Vm } from '../src/core/vm.js'
import type { Volume } from '../src/core/volume.js'
import { DaemonProcess } from '../test/helpers/daemon-process.js'
import { unpackDebianRootfs } from '../test/helpers/debian-image.js'
import { createTestContext } from '../test/helpers/fixtures.js'
import { percentile } from './lib/measure.js'
import { Interrupt } from './lib/interrupt.js'

const IMAGE = 'volume-io:bench'
/** The line prefix that marks the script's results among the console's other output. */
const MARK = 'UIG-IO'
/** Boot (TCG: seconds) plus the dd runs; a guest this slow has something wrong. */
const VM_TIMEOUT_MS = 600_000

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    'seq-mib': { type: 'string', default: '256' },
    'sync-writes': { type: 'string', default: '2000' }
  }
})
function wholeNumber (flag: string, text: string): number {
  const n = Number(text)
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${flag} takes a whole number ≥ 1, not ${text}`)
  return n
}
const runs = wholeNumber('runs', values.runs)
const seqMiB = wholeNumber('seq-mib', values['seq-mib'])
const syncWrites = wholeNumber('sync-writes', values['sync-writes'])
/** Room for the sequential file, the dsync file and ext4's journal and metadata. */
const volumeMiB = Math.max(64, seqMiB + Math.ceil(syncWrites * 4 / 1024) + 128)

const began = performance.now()
const progress = (m: string): void => { process.stderr.write(`[${((performance.now() - began) / 1000).toFixed(0).padStart(4)} s] ${m}\n`) }

// ---------------------------------------------------------------- what must go, whatever happens

const tempDirs = new Set<string>()
let daemon: DaemonProcess | undefined
process.on('exit', () => {
  // Last resort for a crash: the daemon's own cleanup (below) is async and cannot run here.
  if (daemon?.pid !== undefined) { try { process.kill(daemon.pid, 'SIGKILL') } catch { /* gone */ } }
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true })
})
const interrupt = new Interrupt(progress)

// ---------------------------------------------------------------- the commands, shared by guest and host

/** The test, as a POSIX shell script run in `dir`: each dd's summary line after a marker, then the files go. */
function ioScript (dir: string): string {
  // dd's summary is its last stderr line; tail keeps only that one, and a failed dd leaves its error there instead.
  const step = (name: string, dd: string): string => `r=$(${dd} 2>&1 | tail -n 1); echo "${MARK} ${name} $r"`
  return [
    `cd ${dir} || exit 1`,
    step('seq-write', `dd if=/dev/zero of=seq bs=1M count=${seqMiB} oflag=direct conv=fdatasync`),
    step('seq-read', 'dd if=seq of=/dev/null bs=1M iflag=direct'),
    step('dsync', `dd if=/dev/zero of=sync bs=4k count=${syncWrites} oflag=dsync`),
    'rm -f seq sync',
    `echo "${MARK} done"`
  ].join('\n')
}

interface IoSample {
  seqWriteMBps: number
  seqReadMBps: number
  /** 4 KiB O_DSYNC writes per second: one flush each. */
  fsyncsPerS: number
}

/** dd's summary: "268435456 bytes (268 MB, 256 MiB) copied, 1.2345 s, 217 MB/s". */
function ddRate (output: string, name: string): { bytes: number, seconds: number } {
  const line = output.split('\n').find((l) => l.includes(`${MARK} ${name} `))
  const m = line === undefined ? null : /(\d+) bytes .* copied, ([\d.,]+) s/.exec(line)
  if (m === null) throw new Error(`no dd summary for ${name}: ${line ?? '(no line)'}\n${output.slice(-2000)}`)
  return { bytes: Number(m[1]), seconds: Number((m[2] ?? '').replace(',', '.')) }
}

function parseIo (output: string): IoSample {
  if (!output.includes(`${MARK} done`)) throw new Error(`the script did not finish:\n${output.slice(-2000)}`)
  const mbps = (r: { bytes: number, seconds: number }): number => r.bytes / r.seconds / 1e6
  const sync = ddRate(output, 'dsync')
  return {
    seqWriteMBps: mbps(ddRate(output, 'seq-write')),
    seqReadMBps: mbps(ddRate(output, 'seq-read')),
    fsyncsPerS: sync.bytes / 4096 / sync.seconds
  }
}

// ---------------------------------------------------------------- guest and host

/** The guest's image: the Debian root (coreutils dd, a shell) as root's, with /data as the volume's mount point. */
async function buildImage (ctx: Awaited<ReturnType<typeof createTestContext>>): Promise<void> {
  const scratch = await mkdtemp(join(tmpdir(), 'uigniter-bench-volume-root-'))
  tempDirs.add(scratch)
  try {
    const root = join(scratch, 'root')
    await unpackDebianRootfs(root)
    // The root is read-only without an overlay: the mount point must be in the image.
    await mkdir(join(root, 'data'), { recursive: true })
    await ctx.builder.build({
      name: IMAGE,
      source: { kind: 'rootfs', dir: root, entrypoint: '/bin/sh', args: ['-c', 'echo no script given'] },
      env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' }
    }, scratch)
  } finally {
    await rm(scratch, { recursive: true, force: true })
    tempDirs.delete(scratch)
  }
}

/** One VM on a fresh volume, running the script to its end; its figures from the console log. */
async function guestRun (d: DaemonProcess, i: number): Promise<{ sample: IoSample, accel: string }> {
  const volume = `bench-io-${i}`
  await d.api.call<Volume>('POST', '/v1/volumes', { name: volume, sizeMiB: volumeMiB })
  let vm: Vm | undefined
  try {
    vm = await d.api.call<Vm>('POST', '/v1/vms', {
      name: `bench-io-${i}`,
      image: IMAGE,
      network: 'none',
      memoryMiB: 256,
      volumes: [{ name: volume, guestPath: '/data', readOnly: false }],
      args: ['-c', ioScript('/data')]
    })
    const deadline = Date.now() + VM_TIMEOUT_MS
    while (vm.state !== 'exited' && vm.state !== 'failed') {
      if (Date.now() > deadline) throw new Error(`VM ${vm.name} did not end within ${VM_TIMEOUT_MS / 1000} s`)
      interrupt.check()
      await sleep(250)
      vm = await d.api.call<Vm>('GET', `/v1/vms/${vm.id}`)
    }
    const log = await d.api.call<string>('GET', `/v1/vms/${vm.id}/logs`)
    return { sample: parseIo(log), accel: vm.accel }
  } finally {
    if (vm !== undefined) await d.api.call('DELETE', `/v1/vms/${vm.id}?force=true`).catch((err: unknown) => { progress(`cannot delete VM ${vm?.name ?? ''}: ${String(err)}`) })
    await d.api.call('DELETE', `/v1/volumes/${volume}`).catch((err: unknown) => { progress(`cannot delete volume ${volume}: ${String(err)}`) })
  }
}

/** The same script on the host, in a directory beside the volume files. */
async function hostRun (dir: string): Promise<IoSample> {
  await mkdir(dir, { recursive: true })
  const { stdout } = await run('sh', ['-c', ioScript(dir)])
  return parseIo(stdout)
}

interface FioFigures { seqWriteMBps: number, fsyncsPerS: number }

/** fio's view of the same two writes, as a cross-check of dd's arithmetic and of its I/O pattern. */
async function hostFio (dir: string): Promise<FioFigures> {
  await mkdir(dir, { recursive: true })
  const file = join(dir, 'fio')
  // fallocate=none: the file grows with each write, as dd's does; into fio's default preallocated file
  // an O_DSYNC write need not wait for the file's size to be journalled.
  const fio = async (args: string[]): Promise<{ bw_bytes: number, iops: number }> => {
    try {
      const { stdout } = await run('fio', ['--name=io', `--filename=${file}`, '--rw=write', '--ioengine=psync', '--fallocate=none', '--output-format=json', ...args])
      const job = (JSON.parse(stdout) as { jobs: Array<{ write: { bw_bytes: number, iops: number } }> }).jobs[0]
      if (job === undefined) throw new Error(`fio reported no job: ${stdout.slice(0, 500)}`)
      return job.write
    } finally {
      await rm(file, { force: true })
    }
  }
  const seq = await fio(['--bs=1M', `--size=${seqMiB}M`, '--direct=1', '--end_fsync=1'])
  const sync = await fio(['--bs=4k', `--size=${syncWrites * 4}k`, '--sync=dsync'])
  return { seqWriteMBps: seq.bw_bytes / 1e6, fsyncsPerS: sync.iops }
}

// ---------------------------------------------------------------- the run

const fmt = (x: number): string => Number.isNaN(x) ? '—' : x >= 100 ? x.toFixed(0) : x.toFixed(1)
const ratio = (a: number, b: number): string => `${(a / b).toFixed(2)}×`
const p50 = (xs: number[]): number => percentile(xs, 50)
const range = (xs: number[]): string => `${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))}`

const ctx = await createTestContext()
tempDirs.add(ctx.dataDir)
let failed = false
try {
  const loadBefore = (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ')
  progress('building the guest image from the Debian root (debootstrap once per machine)')
  await buildImage(ctx)
  daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.238.${Math.floor(Math.random() * 200)}.0/24` })
  await daemon.start()
  const hostDir = join(ctx.dataDir, 'volumes', 'host-baseline')
  const guest: IoSample[] = []
  const host: IoSample[] = []
  const fio: FioFigures[] = []
  let accel = '?'
  for (let i = 1; i <= runs; i++) {
    interrupt.check()
    const g = await guestRun(daemon, i)
    accel = g.accel
    guest.push(g.sample)
    progress(`guest ${i}/${runs} (${accel}): write ${fmt(g.sample.seqWriteMBps)} MB/s, read ${fmt(g.sample.seqReadMBps)} MB/s, ${fmt(g.sample.fsyncsPerS)} fsyncs/s`)
    interrupt.check()
    const h = await hostRun(hostDir)
    host.push(h)
    progress(`host  ${i}/${runs}: write ${fmt(h.seqWriteMBps)} MB/s, read ${fmt(h.seqReadMBps)} MB/s, ${fmt(h.fsyncsPerS)} fsyncs/s`)
    interrupt.check()
    const f = await hostFio(hostDir)
    fio.push(f)
    progress(`fio   ${i}/${runs}: write ${fmt(f.seqWriteMBps)} MB/s, ${fmt(f.fsyncsPerS)} fsyncs/s`)
  }
  await rm(hostDir, { recursive: true, force: true })
  const loadAfter = (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ')
  const fs = (await run('df', ['--output=source,fstype', hostDir.replace(/\/host-baseline$/, '')])).stdout.trim().split('\n').pop()?.trim().replace(/\s+/, ' ') ?? '?'

  const rows: Array<{ what: string, key: keyof IoSample, unit: string }> = [
    { what: `sequential write, 1 MiB O_DIRECT × ${seqMiB}, then fdatasync`, key: 'seqWriteMBps', unit: 'MB/s' },
    { what: `sequential read, 1 MiB O_DIRECT × ${seqMiB}`, key: 'seqReadMBps', unit: 'MB/s' },
    { what: `4 KiB O_DSYNC writes × ${syncWrites}`, key: 'fsyncsPerS', unit: 'fsyncs/s' }
  ]
  const out = [
    `## Volume I/O: guest (${accel}, virtio-blk, writeback cache) against the host, same filesystem (${fs}); ${runs} runs (median, range)`,
    '',
    `Load average (1, 5, 15 min): ${loadBefore} before, ${loadAfter} after; ${(await run('nproc', [])).stdout.trim()} CPUs.`,
    '',
    '| test | unit | guest | host | guest / host | fio on the host |',
    '|---|---|---:|---:|---:|---:|'
  ]
  for (const r of rows) {
    const g = guest.map((s) => s[r.key])
    const h = host.map((s) => s[r.key])
    const key = r.key
    const f = key === 'seqWriteMBps' || key === 'fsyncsPerS' ? `${fmt(p50(fio.map((s) => s[key])))} (${range(fio.map((s) => s[key]))})` : ''
    out.push(`| ${r.what} | ${r.unit} | ${fmt(p50(g))} (${range(g)}) | ${fmt(p50(h))} (${range(h)}) | ${ratio(p50(g), p50(h))} | ${f} |`)
  }
  out.push('', 'MB is 10^6 bytes. The guest read may come from the host\'s page cache (QEMU\'s writeback cache); the host read does not.')
  process.stdout.write(out.join('\n') + '\n')
} catch (err) {
  failed = true
  process.stderr.write(`volume-io bench failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`)
  if (daemon !== undefined) process.stderr.write(`daemon output (tail):\n${daemon.output.slice(-2000)}\n`)
} finally {
  // VMs, then volumes, then the daemon and its network: each holds the next.
  if (daemon !== undefined) {
    for (const vm of await daemon.api.call<Vm[]>('GET', '/v1/vms?all=true').catch(() => [])) {
      await daemon.api.call('DELETE', `/v1/vms/${vm.id}?force=true`).catch(() => {})
    }
    for (const v of await daemon.api.call<Volume[]>('GET', '/v1/volumes').catch(() => [])) {
      await daemon.api.call('DELETE', `/v1/volumes/${v.name}`).catch((err: unknown) => { progress(`cannot delete volume ${v.name}: ${String(err)}`) })
    }
    await daemon.removeEverything()
  }
  await ctx.cleanup()
  tempDirs.delete(ctx.dataDir)
}
process.exitCode = failed ? 1 : 0
