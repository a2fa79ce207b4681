import { constants, createWriteStream } from 'node:fs'
import { access, mkdir, readFile, rename, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { createGzip } from 'node:zlib'
import type { Config } from '../../core/config.js'
import { writeFileAtomic } from '../../core/fs-atomic.js'
import type { ImageManifest } from '../../core/image.js'
import { initBinaryPath } from '../../core/package-paths.js'
import { CpioWriter } from '../../guest/cpio-writer.js'
import { QemuDriver } from './qemu-driver.js'
import { VmStateDir } from './vm-state-dir.js'
import type { Accel } from '../../core/ports/vmm-driver.js'

export interface AccelChoice { accel: Accel, reason: string }

/** KVM boots our guest to init in well under a second; a PVM host's KVM crawls far past this (fact 1). */
const PROBE_DEADLINE_MS = 8000

/**
 * Decides between KVM and TCG. An explicit setting wins. With `auto`, a tiny
 * guest (our kernel and an initramfs holding only the init, which answers
 * `uigniter.probe=1` and reboots) boots under KVM with a deadline; if it does
 * not reach init, or QEMU reports a KVM error, TCG is used. The answer is
 * cached per host boot and kernel digest, since neither changes while the host runs.
 */
export async function chooseAccel (config: Config, kernelPath: string, kernelDigest: string): Promise<AccelChoice> {
  if (config.accel !== 'auto') return { accel: config.accel, reason: `accel "${config.accel}" is set in the configuration` }
  try {
    await access('/dev/kvm', constants.R_OK | constants.W_OK)
  } catch {
    return { accel: 'tcg', reason: '/dev/kvm is missing or not accessible' }
  }
  const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim()
  const cachePath = join(config.cacheDir, 'accel-probe.json')
  try {
    const cached = JSON.parse(await readFile(cachePath, 'utf8')) as AccelChoice & { bootId: string, kernelDigest: string }
    if (cached.bootId === bootId && cached.kernelDigest === kernelDigest) return { accel: cached.accel, reason: cached.reason }
  } catch { /* no cache yet */ }
  const choice = await probeKvm(config.cacheDir, kernelPath)
  await writeFileAtomic(cachePath, JSON.stringify({ ...choice, bootId, kernelDigest }) + '\n')
  return choice
}

async function probeKvm (cacheDir: string, kernelPath: string): Promise<AccelChoice> {
  const initrd = await probeInitrd(cacheDir)
  const manifest: ImageManifest = {
    schemaVersion: 1,
    name: 'accel-probe',
    tag: 'latest',
    digest: `sha256:${'0'.repeat(64)}`,
    size: 0,
    format: 'initramfs',
    kernel: { source: 'build', version: '', blob: { digest: `sha256:${'0'.repeat(64)}`, size: 0 } },
    init: { version: 1, digest: `sha256:${'0'.repeat(64)}` },
    cmdline: '',
    entrypoint: [],
    env: {},
    workdir: '/',
    vcpus: 1,
    memoryMiB: 64,
    ports: [],
    machine: { type: 'microvm', transport: 'mmio' },
    createdAt: new Date(0).toISOString()
  }
  // The same driver as every VM, in a state directory of its own that goes with the probe.
  const driver = new QemuDriver({ stopTimeouts: { guestMarginMs: 0, quitMs: 500, termMs: 500, killMs: 2000 } })
  const id = `accel-probe-${process.pid}`
  const dir = new VmStateDir(join(cacheDir, 'run', id))
  let vm
  try {
    vm = await driver.spawn({ id, stateDir: dir.dir, launch: { manifest, kernelPath, rootfsPath: initrd, accel: 'kvm', vcpus: 1, memoryMiB: 64, network: { mode: 'none' }, extraCmdline: ['uigniter.probe=1'] } })
  } catch (err) {
    await driver.remove(dir.dir).catch(() => {})
    return { accel: 'tcg', reason: `QEMU could not start a KVM guest (${(err as Error).message}); using TCG` }
  }
  try {
    await vm.waitForMarker('probe-ok', PROBE_DEADLINE_MS)
    return { accel: 'kvm', reason: 'a KVM guest reached init during the start-up probe' }
  } catch {
    vm.kill()
    const exit = await vm.exited
    const kvmError = /KVM[^\n]*error[^\n]*/i.exec(await dir.qemuLogTail())?.[0]
    return {
      accel: 'tcg',
      reason: kvmError !== undefined
        ? `KVM cannot run guests here (QEMU: "${kvmError.trim()}"); using TCG`
        : exit.reason === 'killed'
          ? `a KVM guest did not reach init within ${PROBE_DEADLINE_MS} ms; using TCG`
          : `the KVM probe failed (${exit.reason}: ${exit.detail}); using TCG`
    }
  } finally {
    vm.kill()
    await vm.exited
    await driver.remove(dir.dir).catch(() => {})
  }
}

/** An initramfs with the init alone, cached next to the probe result. */
async function probeInitrd (cacheDir: string): Promise<string> {
  const path = join(cacheDir, `probe-initrd-${Math.round((await stat(initBinaryPath)).mtimeMs)}.gz`)
  try {
    await stat(path)
    return path
  } catch { /* build it */ }
  await mkdir(cacheDir, { recursive: true })
  const tmp = `${path}.tmp-${process.pid}`
  try {
    const gzip = createGzip()
    const done = pipeline(gzip, createWriteStream(tmp))
    const cpio = new CpioWriter(gzip)
    for (const dir of ['dev', 'proc', 'sys', 'tmp', 'run']) await cpio.addDirectory(dir)
    await cpio.addFile('init', { hostPath: initBinaryPath }, 0o755)
    await cpio.close()
    await done
    await rename(tmp, path)
  } finally {
    await rm(tmp, { force: true })
  }
  return path
}
