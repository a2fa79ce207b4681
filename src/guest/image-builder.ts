import { createHash } from 'node:crypto'
import { constants as osConstants } from 'node:os'
import { stat } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { Value } from '@sinclair/typebox/value'
import { parseCmdline } from '../core/cmdline-placeholders.js'
import { describeSchemaErrors } from '../core/config.js'
import { UigniterError, hasErrno, rethrowNoSpace } from '../core/errors.js'
import { BuildSpecSchema, parseImageRef, type AfterClone, type BuildSpec, type ImageFormat, type ImageManifest } from '../core/image.js'
import { initBinaryPath } from '../core/package-paths.js'
import { Progress, formatBytes } from '../core/progress.js'
import { isBzImage, readElf } from './elf-file.js'
import { digestFile, type ImageStore } from './image-store.js'
import { checkReadable, loadSource } from './image-sources.js'
import { writeDisk, writeInitramfs } from './image-writers.js'
import type { GuestKernel, KernelSource } from './kernel-source.js'
import { RootfsTree } from './rootfs-tree.js'

/** Images whose files add up to more than this become a shared read-only disk (design.md fact 7). */
export const INITRAMFS_LIMIT = 24 * 1024 * 1024
/** 4: mounts persistent volumes (uigniter.volume=). 5: a fresh volume gets a copy of the image's files at its mount point. */
export const INIT_VERSION = 5
/** The first init that mounts volumes: an older one would ignore them, and its app would run without its data. */
export const VOLUMES_INIT_VERSION = 4

/**
 * Validates a build spec (from CLI flags or a spec file) and fills defaults.
 * Throws UIG_ERR_IMAGE_SPEC_INVALID naming the bad field, and
 * UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER for a unikernel command line with an
 * unknown placeholder.
 */
export function parseBuildSpec (input: unknown): BuildSpec {
  const withDefaults = Value.Default(BuildSpecSchema, structuredClone(input))
  if (!Value.Check(BuildSpecSchema, withDefaults)) {
    throw new UigniterError('UIG_ERR_IMAGE_SPEC_INVALID', `invalid build spec: ${describeSchemaErrors(BuildSpecSchema, withDefaults)}`)
  }
  parseImageRef(withDefaults.name)
  // A typo in a placeholder is refused now, not at every launch (UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER).
  if (withDefaults.source.kind === 'unikernel') parseCmdline(withDefaults.source.cmdline)
  return withDefaults
}

/**
 * Encodes the app's start-up for the guest init: NUL-terminated key/value
 * strings (`arg`, `env`, `cwd`), which C can parse without a JSON library and
 * which can carry any byte an argv can.
 */
export function encodeGuestConfig (argv: string[], env: Record<string, string>, workdir: string, run: { user?: { uid: number, gid: number }, stopSignal?: string } = {}): Buffer {
  const parts: string[] = []
  for (const arg of argv) parts.push('arg', arg)
  for (const [k, v] of Object.entries(env)) parts.push('env', `${k}=${v}`)
  parts.push('cwd', workdir)
  if (run.user !== undefined) parts.push('uid', String(run.user.uid), 'gid', String(run.user.gid))
  if (run.stopSignal !== undefined) {
    const number = (osConstants.signals as Record<string, number | undefined>)[run.stopSignal]
    if (number === undefined) throw new UigniterError('UIG_ERR_IMAGE_SPEC_INVALID', `stopSignal ${run.stopSignal} is not a signal this host knows (SIGTERM, SIGINT, SIGQUIT, ...)`)
    parts.push('stopsig', String(number))
  }
  return Buffer.from(parts.map((p) => p + '\0').join(''))
}

const MIB = 1024 * 1024
const MICROVM: ImageManifest['machine'] = { type: 'microvm', transport: 'mmio' }

/**
 * Builds images: source → file tree (+ guest init, + kernel modules) →
 * initramfs or disk → blobs → manifest. Everything is written inside a work
 * dir of the store and moved in by rename at the end, so a failed build
 * leaves nothing behind. App images get the kernel of the configured source
 * (`createKernelSource`); unikernels bring their own.
 */
export class ImageBuilder {
  readonly #store: ImageStore
  readonly #kernels: KernelSource

  constructor (store: ImageStore, kernels: KernelSource) {
    this.#store = store
    this.#kernels = kernels
  }

  /** `baseDir` resolves relative paths of the spec (the spec file's directory). */
  async build (input: unknown, baseDir = process.cwd()): Promise<ImageManifest> {
    const spec = parseBuildSpec(input)
    const { name, tag } = parseImageRef(spec.name)
    const progress = new Progress(`image ${name}:${tag}`)
    const work = await this.#store.createWorkDir()
    try {
      const parts = spec.source.kind === 'unikernel'
        ? await this.#unikernelParts(spec, baseDir)
        : await this.#appParts(spec, baseDir, work, progress)
      const blobs = [parts.kernel.blob, parts.rootfs].filter((b) => b !== undefined)
      const content = {
        format: parts.format,
        kernel: parts.kernel,
        rootfs: parts.rootfs,
        init: parts.init,
        cmdline: parts.cmdline,
        entrypoint: parts.entrypoint,
        env: parts.env ?? spec.env,
        workdir: parts.workdir,
        vcpus: spec.vcpus,
        memoryMiB: parts.memoryMiB,
        ports: spec.ports,
        machine: parts.machine,
        ...(parts.afterClone !== undefined ? { afterClone: parts.afterClone } : {}),
        ...(parts.cloneSafe !== undefined ? { cloneSafe: parts.cloneSafe } : {}),
        ...(spec.user !== undefined ? { user: spec.user } : {}),
        ...(spec.stopSignal !== undefined ? { stopSignal: spec.stopSignal } : {}),
        ...(spec.labels !== undefined ? { labels: spec.labels } : {}),
        ...(spec.overlaySizeMiB !== undefined ? { overlaySizeMiB: spec.overlaySizeMiB } : {}),
        ...(spec.origin !== undefined ? { origin: spec.origin } : {})
      }
      const manifest: ImageManifest = {
        schemaVersion: 1,
        name,
        tag,
        // The digest covers what boots, not the name or the time: the same build gives the same digest.
        digest: `sha256:${createHash('sha256').update(JSON.stringify(content)).digest('hex')}`,
        size: blobs.reduce((n, b) => n + b.size, 0),
        ...content,
        createdAt: new Date().toISOString()
      }
      if (manifest.rootfs === undefined) delete manifest.rootfs
      await this.#store.commit(manifest)
      progress.done()
      return manifest
    } catch (err) {
      progress.done()
      rethrowNoSpace(err, this.#store.root)
    } finally {
      await this.#store.discardWorkDir(work)
    }
  }

  async #appParts (spec: BuildSpec, baseDir: string, work: string, progress: Progress): Promise<Parts> {
    if (spec.source.kind === 'unikernel') throw new Error('unreachable')
    progress.update('collecting files')
    const { tree, argv, workdir, ...source } = await loadSource(spec.source, baseDir, spec.cloneSafe !== undefined ? { cloneSafe: spec.cloneSafe } : {})
    const env = mergeEnv(source.env ?? {}, spec.env)
    const kernel = await this.#kernels.get()
    const init = await guestInit()
    const machine = pickMachine(spec.machine, kernel)
    const contentSize = tree.contentSize()
    // An archive of the initramfs records every file as root's: a tree that keeps its owners goes on a disk.
    const keepsOwners = spec.source.kind === 'rootfs' && spec.source.owners === 'keep'
    if (keepsOwners && spec.format === 'initramfs') throw new UigniterError('UIG_ERR_IMAGE_SPEC_INVALID', 'a root file system that keeps its owners needs a disk: format squashfs or ext4 (or auto), not initramfs')
    const format = pickFormat(keepsOwners && spec.format === 'auto' ? 'squashfs' : spec.format, contentSize, kernel)
    addGuestFiles(tree, format, init.size, encodeGuestConfig(argv, env, spec.workdir ?? workdir, {
      ...(spec.user !== undefined ? { user: spec.user } : {}),
      ...(spec.stopSignal !== undefined ? { stopSignal: spec.stopSignal } : {})
    }))
    await addModules(tree, kernel)
    progress.update(`writing ${format} (${formatBytes(tree.contentSize())} of files)`)
    const out = join(work, `rootfs.${format}`)
    if (format === 'initramfs') await writeInitramfs(tree, out)
    else await writeDisk(tree, format, join(work, 'staging'), out)
    progress.update('storing')
    const rootfs = await this.#store.putBlob(out)
    const kernelBlob = await this.#store.importFile(kernel.path)
    // The files of an initramfs live in guest RAM: when the kernel, not the
    // spec, made this an initramfs instead of a disk, the spec's memory did not count them.
    const forcedIntoRam = spec.format === 'auto' && format === 'initramfs' && contentSize > INITRAMFS_LIMIT ? Math.ceil(contentSize / MIB) : 0
    return {
      format,
      kernel: { source: kernel.source, version: kernel.key, blob: kernelBlob },
      rootfs,
      init: { version: init.version, digest: init.digest },
      cmdline: format === 'initramfs' ? '' : `root=/dev/vda ro rootfstype=${format} init=/uigniter/init`,
      entrypoint: argv,
      workdir: spec.workdir ?? workdir,
      memoryMiB: Math.min(65536, spec.memoryMiB + kernel.extraMemoryMiB + forcedIntoRam),
      machine,
      env,
      ...afterCloneParts(spec, source)
    }
  }

  async #unikernelParts (spec: BuildSpec, baseDir: string): Promise<Parts> {
    const source = spec.source
    if (source.kind !== 'unikernel') throw new Error('unreachable')
    const kernelPath = resolve(baseDir, source.kernel)
    await checkReadable(kernelPath, 'kernel')
    if (!(await isBootable(kernelPath))) {
      throw new UigniterError('UIG_ERR_KERNEL_NOT_BOOTABLE',
        `${kernelPath} is not a kernel QEMU can boot: expected an x86-64 ELF with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) or a bzImage`)
    }
    let rootfs: Parts['rootfs']
    if (source.disk !== undefined) {
      const diskPath = resolve(baseDir, source.disk)
      await checkReadable(diskPath, 'disk')
      rootfs = await this.#store.importFile(diskPath)
    }
    return {
      format: 'unikernel',
      kernel: { source: 'image', version: 'unikernel', blob: await this.#store.importFile(kernelPath) },
      rootfs,
      init: null,
      cmdline: source.cmdline,
      entrypoint: [],
      workdir: '/',
      memoryMiB: spec.memoryMiB,
      machine: spec.machine ?? MICROVM
    }
  }
}

interface Parts {
  env?: Record<string, string>
  afterClone?: AfterClone
  cloneSafe?: boolean
  format: ImageFormat
  kernel: ImageManifest['kernel']
  rootfs: { digest: string, size: number } | undefined
  init: ImageManifest['init']
  cmdline: string
  entrypoint: string[]
  workdir: string
  memoryMiB: number
  machine: ImageManifest['machine']
}

/** The source's variables under the spec's; NODE_OPTIONS of both are kept, the source's first. */
function mergeEnv (source: Record<string, string>, spec: Record<string, string>): Record<string, string> {
  const env = { ...source, ...spec }
  if (source.NODE_OPTIONS !== undefined && spec.NODE_OPTIONS !== undefined) env.NODE_OPTIONS = `${source.NODE_OPTIONS} ${spec.NODE_OPTIONS}`
  return env
}

/** The spec's hook (null: none) over the source's; the spec's cloneSafe over the source's. */
function afterCloneParts (spec: BuildSpec, source: { afterClone?: AfterClone, cloneSafe?: boolean }): Pick<Parts, 'afterClone' | 'cloneSafe'> {
  const afterClone = spec.afterClone === undefined ? source.afterClone : spec.afterClone ?? undefined
  const cloneSafe = spec.cloneSafe ?? source.cloneSafe
  return { ...(afterClone !== undefined ? { afterClone } : {}), ...(cloneSafe !== undefined ? { cloneSafe } : {}) }
}

/** The spec's machine if the kernel boots on it, else the kernel's default machine. */
function pickMachine (asked: BuildSpec['machine'], kernel: GuestKernel): ImageManifest['machine'] {
  const machines = kernel.machines.map((m) => `${m.type}/${m.transport}`)
  if (asked === undefined) return kernel.machines[0] ?? MICROVM
  if (!machines.includes(`${asked.type}/${asked.transport}`)) {
    throw new UigniterError('UIG_ERR_IMAGE_KERNEL_MISMATCH',
      `machine ${asked.type}/${asked.transport} cannot boot the "${kernel.source}" guest kernel, which boots on ${machines.join(' or ')}; drop "machine" from the spec`)
  }
  return asked
}

/**
 * A kernel with modules has its disk drivers (virtio_blk, squashfs) among
 * them, and the kernel mounts a disk root before the init could load any
 * module: its images are always initramfs. (A two-stage init, loading the
 * modules from a small initramfs and then switching to the disk, would lift
 * this; until then a large app costs RAM, which the builder adds to memoryMiB.)
 */
function pickFormat (asked: BuildSpec['format'], size: number, kernel: GuestKernel): Exclude<ImageFormat, 'unikernel'> {
  const modular = kernel.modules.length > 0
  if (modular && (asked === 'squashfs' || asked === 'ext4')) {
    throw new UigniterError('UIG_ERR_IMAGE_KERNEL_MISMATCH',
      `format ${asked} cannot boot with the "${kernel.source}" guest kernel: its disk driver is a module, loaded from the initramfs after the root is mounted; use format auto or initramfs, or kernel.source "build"`)
  }
  if ((asked === 'initramfs' || modular) && size > 0xffffffff) {
    throw new UigniterError('UIG_ERR_IMAGE_TOO_LARGE', modular
      ? `the image holds ${formatBytes(size)} of files, too much for an initramfs, the only format the "${kernel.source}" guest kernel boots; use kernel.source "build" and --format squashfs`
      : `the image holds ${formatBytes(size)} of files, too much for an initramfs; use --format squashfs`)
  }
  if (asked !== 'auto') return asked
  return modular || size <= INITRAMFS_LIMIT ? 'initramfs' : 'squashfs'
}

/** The kernel's modules at their guest paths, and /uigniter/modules listing them in load order for the init. */
async function addModules (tree: RootfsTree, kernel: GuestKernel): Promise<void> {
  if (kernel.modules.length === 0) return
  for (const module of kernel.modules) {
    let size: number
    try {
      size = (await stat(module.hostPath)).size
    } catch (err) {
      if (!hasErrno(err, 'ENOENT')) throw err
      throw new UigniterError('UIG_ERR_KERNEL_NOT_BUILT', `${module.hostPath} is missing from the kernel cache; run "uigniter kernel build --force"`, { cause: err })
    }
    tree.addFile(module.guestPath, { hostPath: module.hostPath, size }, 0o644)
  }
  tree.addFile('/uigniter/modules', { data: Buffer.from(kernel.modules.map((m) => m.guestPath).join('\n') + '\n') }, 0o644)
}

/**
 * What every app image carries besides the app: the init, its config, the
 * mount points a read-only root cannot create at boot, and /etc files that
 * point at /run, where the init writes the VM's own resolv.conf.
 */
function addGuestFiles (tree: RootfsTree, format: string, initSize: number, config: Buffer): void {
  tree.addFile(format === 'initramfs' ? '/init' : '/uigniter/init', { hostPath: initBinaryPath, size: initSize }, 0o755)
  tree.addFile('/uigniter/config', { data: config }, 0o644)
  for (const dir of ['/proc', '/sys', '/dev', '/tmp', '/run', '/etc']) tree.addDirectory(dir, dir === '/tmp' ? 0o1777 : 0o755)
  tree.addSymlink('/etc/resolv.conf', '/run/resolv.conf')
  if (!tree.has('/etc/passwd')) tree.addFile('/etc/passwd', { data: Buffer.from('root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/:/nonexistent\n') })
  if (!tree.has('/etc/group')) tree.addFile('/etc/group', { data: Buffer.from('root:x:0:\nnogroup:x:65534:\n') })
  if (!tree.has('/etc/hosts')) tree.addFile('/etc/hosts', { data: Buffer.from('127.0.0.1 localhost\n::1 localhost\n') })
}

async function guestInit (): Promise<{ version: number, digest: string, size: number }> {
  let size: number
  try {
    size = (await stat(initBinaryPath)).size
  } catch (err) {
    if (hasErrno(err, 'ENOENT')) throw new UigniterError('UIG_ERR_INIT_NOT_BUILT', `the guest init ${initBinaryPath} is not built; run "npm run setup"`)
    throw err
  }
  return { version: INIT_VERSION, digest: await digestFile(initBinaryPath), size }
}

async function isBootable (path: string): Promise<boolean> {
  if (await isBzImage(path)) return true
  try {
    return (await readElf(path)).pvhEntry
  } catch (err) {
    if (err instanceof UigniterError && (err.code === 'UIG_ERR_IMAGE_NOT_ELF' || err.code === 'UIG_ERR_IMAGE_UNSUPPORTED_ELF')) return false
    throw err
  }
}
