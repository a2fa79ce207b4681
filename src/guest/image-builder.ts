import { createHash } from 'node:crypto'
import { stat } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { Value } from '@sinclair/typebox/value'
import { describeSchemaErrors } from '../core/config.js'
import { UigniterError, hasErrno, rethrowNoSpace } from '../core/errors.js'
import { BuildSpecSchema, parseImageRef, type BuildSpec, type ImageFormat, type ImageManifest } from '../core/image.js'
import { initBinaryPath } from '../core/package-paths.js'
import { Progress, formatBytes } from '../core/progress.js'
import { isBzImage, readElf } from './elf-file.js'
import { digestFile, type ImageStore } from './image-store.js'
import { checkReadable, loadSource } from './image-sources.js'
import { writeDisk, writeInitramfs } from './image-writers.js'
import type { KernelCache } from './kernel-cache.js'
import { RootfsTree } from './rootfs-tree.js'

/** Images whose files add up to more than this become a shared read-only disk (design.md fact 7). */
export const INITRAMFS_LIMIT = 24 * 1024 * 1024
export const INIT_VERSION = 1

/**
 * Validates a build spec (from CLI flags or a spec file) and fills defaults.
 * Throws UIG_ERR_IMAGE_SPEC_INVALID naming the bad field.
 */
export function parseBuildSpec (input: unknown): BuildSpec {
  const withDefaults = Value.Default(BuildSpecSchema, structuredClone(input))
  if (!Value.Check(BuildSpecSchema, withDefaults)) {
    throw new UigniterError('UIG_ERR_IMAGE_SPEC_INVALID', `invalid build spec: ${describeSchemaErrors(BuildSpecSchema, withDefaults)}`)
  }
  parseImageRef(withDefaults.name)
  return withDefaults
}

/**
 * Encodes the app's start-up for the guest init: NUL-terminated key/value
 * strings (`arg`, `env`, `cwd`), which C can parse without a JSON library and
 * which can carry any byte an argv can.
 */
export function encodeGuestConfig (argv: string[], env: Record<string, string>, workdir: string): Buffer {
  const parts: string[] = []
  for (const arg of argv) parts.push('arg', arg)
  for (const [k, v] of Object.entries(env)) parts.push('env', `${k}=${v}`)
  parts.push('cwd', workdir)
  return Buffer.from(parts.map((p) => p + '\0').join(''))
}

/**
 * Builds images: source → file tree (+ guest init) → initramfs or disk →
 * blobs → manifest. Everything is written inside a work dir of the store and
 * moved in by rename at the end, so a failed build leaves nothing behind.
 */
export class ImageBuilder {
  readonly #store: ImageStore
  readonly #kernels: KernelCache

  constructor (store: ImageStore, kernels: KernelCache) {
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
        ? await this.#unikernelParts(spec.source, baseDir)
        : await this.#appParts(spec, baseDir, work, progress)
      const blobs = [parts.kernel.blob, parts.rootfs].filter((b) => b !== undefined)
      const content = {
        format: parts.format,
        kernel: parts.kernel,
        rootfs: parts.rootfs,
        init: parts.init,
        cmdline: parts.cmdline,
        entrypoint: parts.entrypoint,
        env: spec.env,
        workdir: parts.workdir,
        vcpus: spec.vcpus,
        memoryMiB: spec.memoryMiB,
        ports: spec.ports,
        machine: spec.machine ?? { type: 'microvm' as const, transport: 'mmio' as const }
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
    const { tree, argv, workdir } = await loadSource(spec.source, baseDir)
    const kernel = await this.#kernels.get()
    const init = await guestInit()
    const format = pickFormat(spec.format, tree.contentSize())
    addGuestFiles(tree, format, init.size, encodeGuestConfig(argv, spec.env, spec.workdir ?? workdir))
    progress.update(`writing ${format} (${formatBytes(tree.contentSize())} of files)`)
    const out = join(work, `rootfs.${format}`)
    if (format === 'initramfs') await writeInitramfs(tree, out)
    else await writeDisk(tree, format, join(work, 'staging'), out)
    progress.update('storing')
    const rootfs = await this.#store.putBlob(out)
    const kernelBlob = await this.#store.importFile(kernel.path)
    return {
      format,
      kernel: { source: 'build', version: kernel.key, blob: kernelBlob },
      rootfs,
      init: { version: init.version, digest: init.digest },
      cmdline: format === 'initramfs' ? '' : `root=/dev/vda ro rootfstype=${format} init=/uigniter/init`,
      entrypoint: argv,
      workdir: spec.workdir ?? workdir
    }
  }

  async #unikernelParts (source: Extract<BuildSpec['source'], { kind: 'unikernel' }>, baseDir: string): Promise<Parts> {
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
      workdir: '/'
    }
  }
}

interface Parts {
  format: ImageFormat
  kernel: ImageManifest['kernel']
  rootfs: { digest: string, size: number } | undefined
  init: ImageManifest['init']
  cmdline: string
  entrypoint: string[]
  workdir: string
}

function pickFormat (asked: BuildSpec['format'], size: number): Exclude<ImageFormat, 'unikernel'> {
  if (asked === 'initramfs' && size > 0xffffffff) {
    throw new UigniterError('UIG_ERR_IMAGE_TOO_LARGE', `the image holds ${formatBytes(size)} of files, too much for an initramfs; use --format squashfs`)
  }
  if (asked !== 'auto') return asked
  return size <= INITRAMFS_LIMIT ? 'initramfs' : 'squashfs'
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
