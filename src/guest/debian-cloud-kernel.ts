import { randomBytes } from 'node:crypto'
import { copyFile, mkdir, readFile, readdir, rename, rm, stat } from 'node:fs/promises'
import { dirname, join, posix } from 'node:path'
import { UigniterError, hasErrno, rethrowNoSpace } from '../core/errors.js'
import { run } from '../core/exec.js'
import { writeFileAtomic } from '../core/fs-atomic.js'
import { Progress } from '../core/progress.js'
import { extractVmlinux } from './bzimage.js'
import { decompressToFile, type Compression } from './decompress.js'
import type { GuestKernel, GuestModule, KernelSource } from './kernel-source.js'
import { removeStaleWorkDirs } from './kernel-work-dirs.js'
import { resolveModuleLoadOrder } from './kernel-modules.js'

const META_PACKAGE = 'linux-image-cloud-amd64'
const INSTALL_LINE = `apt-get install -y ${META_PACKAGE}`
/** Bump when the derived files change (extraction, module lists), so caches made by older code are not reused. */
const RECIPE_VERSION = '1'

/**
 * Drivers the guest cannot do without. Debian's cloud kernel lacks
 * CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so it cannot find virtio-mmio devices
 * on microvm without ACPI; its images boot on q35 with virtio-pci instead.
 */
const REQUIRED_MODULES = ['virtio_pci', 'virtio_net', 'virtio_blk', 'virtio_console', 'virtio_rng']
/**
 * Loaded when the kernel has them as modules (Debian's has ext4 built in and
 * no 9p at all): vsock, 9p and ext4 match what our kernel offers (sockets,
 * shared directories, writable disks). Left out on purpose, because each
 * module costs boot time under TCG (measured: the 16-module set took
 * 0.1-0.2 s longer from init to app than the required five with their deps)
 * and these cannot be used: virtio_mmio (the images boot on q35, with PCI)
 * and squashfs (the images are always initramfs, see pickFormat in
 * image-builder.ts).
 */
const OPTIONAL_MODULES = ['vmw_vsock_virtio_transport', '9pnet_virtio', '9p', 'ext4']

/**
 * Measured under TCG on q35: with 64 MiB the cloud kernel runs out of memory
 * before init (our kernel boots in 64 MiB), with 80 MiB it boots. Added to
 * the image's memoryMiB with some margin.
 */
const EXTRA_MEMORY_MIB = 64

/** Debian's cloud kernel, prepared for QEMU; `info.json` of its cache entry. */
export interface DebianCloudKernelInfo extends GuestKernel {
  source: 'debian-cloud'
  /** The Debian package holding the kernel, e.g. linux-image-6.1.0-56-cloud-amd64. */
  package: string
  packageVersion: string
  /** The packaged bzImage the vmlinux was extracted from. */
  bzImage: string
  /** Asked-for drivers that this kernel has built in (nothing to load for them). */
  builtin: string[]
  preparedAt: string
}

interface Installed { release: string, package: string, packageVersion: string, bzImage: string, modulesDir: string }

/**
 * The fallback guest kernel: Debian's packaged cloud kernel
 * (`linux-image-cloud-amd64`). Its virtio drivers are modules, so besides the
 * kernel it gives the module files the init must load, in dependency order.
 * Derived files (the ELF vmlinux extracted from the bzImage, the modules,
 * decompressed when Debian ships them compressed) are cached under
 * `<cacheDir>/kernels/debian-cloud-<key>`, made in a sibling work dir and
 * renamed into place when complete. Library code never installs the package;
 * it says how to.
 */
export class DebianCloudKernel implements KernelSource {
  readonly kind = 'debian-cloud'
  readonly #dir: string

  constructor (cacheDir: string) {
    this.#dir = join(cacheDir, 'kernels')
  }

  /** The prepared kernel for the installed package, or undefined when it still has to be prepared. */
  async find (): Promise<DebianCloudKernelInfo | undefined> {
    return await this.#read(await locateInstalled())
  }

  async #read (installed: Installed): Promise<DebianCloudKernelInfo | undefined> {
    try {
      return JSON.parse(await readFile(join(this.#entryDir(installed), 'info.json'), 'utf8')) as DebianCloudKernelInfo
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) return undefined
      throw new UigniterError('UIG_ERR_CONFIG_INVALID', `cannot read the kernel cache in ${this.#dir}: ${(err as Error).message}; set cacheDir (UIGNITER_CACHE_DIR) to a directory you can read`, { cause: err })
    }
  }

  /** The prepared kernel, preparing it first if needed (a few seconds, once per package version). */
  async get (): Promise<DebianCloudKernelInfo> {
    return (await this.find()) ?? await this.build()
  }

  /** Prepares the kernel's derived files unless they are cached (or `force`). */
  async build (options: { force?: boolean } = {}): Promise<DebianCloudKernelInfo> {
    const installed = await locateInstalled()
    if (options.force !== true) {
      const cached = await this.#read(installed)
      if (cached !== undefined) return cached
    }
    await removeStaleWorkDirs(this.#dir)
    const final = this.#entryDir(installed)
    // The ".out-<pid>-" prefix lets any kernel source remove it if this process dies.
    const work = join(this.#dir, `.out-${process.pid}-debian-cloud-${randomBytes(4).toString('hex')}`)
    const progress = new Progress(`kernel debian-cloud ${installed.release}`)
    try {
      await rm(work, { recursive: true, force: true })
      await mkdir(work, { recursive: true })
      progress.update(`extracting vmlinux from ${installed.bzImage}`)
      await extractVmlinux(installed.bzImage, join(work, 'vmlinux'))
      progress.update('collecting modules')
      const { modules, builtin } = await collectModules(installed, join(work, 'modules'), join(final, 'modules'))
      const info: DebianCloudKernelInfo = {
        source: 'debian-cloud',
        key: keyOf(installed),
        version: installed.release,
        path: join(final, 'vmlinux'),
        size: (await stat(join(work, 'vmlinux'))).size,
        modules,
        machines: [{ type: 'q35', transport: 'pci' }, { type: 'pc', transport: 'pci' }],
        extraMemoryMiB: EXTRA_MEMORY_MIB,
        package: installed.package,
        packageVersion: installed.packageVersion,
        bzImage: installed.bzImage,
        builtin,
        preparedAt: new Date().toISOString()
      }
      await writeFileAtomic(join(work, 'info.json'), JSON.stringify(info, null, 2) + '\n')
      if (options.force === true) await rm(final, { recursive: true, force: true })
      try {
        await rename(work, final)
      } catch (err) {
        // Another process prepared the same kernel meanwhile: its entry is as good as ours.
        if (!hasErrno(err, 'ENOTEMPTY', 'EEXIST')) throw err
      }
      progress.done()
      return info
    } catch (err) {
      progress.done()
      rethrowNoSpace(err, this.#dir)
    } finally {
      await rm(work, { recursive: true, force: true })
    }
  }

  #entryDir (installed: Installed): string {
    return join(this.#dir, `debian-cloud-${keyOf(installed)}`)
  }
}

/** `6.1.0-56-cloud-amd64-6.1.192-2-r1`: the kernel release, the package version, the recipe. */
function keyOf (installed: Installed): string {
  return `${installed.release}-${installed.packageVersion}-r${RECIPE_VERSION}`.replace(/[^A-Za-z0-9._+-]/g, '_')
}

/**
 * Finds the cloud kernel to use: the one the metapackage depends on, else the
 * newest installed `linux-image-*-cloud-amd64`. Throws UIG_ERR_HOST_MISSING_TOOL
 * with the install line when there is none.
 */
async function locateInstalled (): Promise<Installed> {
  let release = await releaseFromMetapackage()
  if (release === undefined) {
    let names: string[] = []
    try { names = await readdir('/boot') } catch { /* no /boot: nothing installed */ }
    release = names.map((n) => /^vmlinuz-(.+-cloud-amd64)$/.exec(n)?.[1]).filter((r) => r !== undefined)
      .sort((a, b) => a.localeCompare(b, 'en', { numeric: true })).pop()
  }
  const missing = (what: string): UigniterError => new UigniterError('UIG_ERR_HOST_MISSING_TOOL',
    `kernel.source is "debian-cloud" but ${what}; install Debian's cloud kernel with: ${INSTALL_LINE}`)
  if (release === undefined) throw missing(`no ${META_PACKAGE} kernel is installed`)
  const installed: Installed = {
    release,
    package: `linux-image-${release}`,
    packageVersion: await packageVersion(`linux-image-${release}`, `/boot/vmlinuz-${release}`),
    bzImage: `/boot/vmlinuz-${release}`,
    modulesDir: `/lib/modules/${release}`
  }
  for (const file of [installed.bzImage, join(installed.modulesDir, 'modules.dep')]) {
    try {
      await stat(file)
    } catch {
      throw missing(`${file} is missing`)
    }
  }
  return installed
}

async function releaseFromMetapackage (): Promise<string | undefined> {
  try {
    const { stdout } = await run('dpkg-query', ['-W', '-f=${Status}\\n${Depends}', META_PACKAGE])
    const [status = '', depends = ''] = stdout.split('\n')
    if (!status.endsWith('installed') || status.includes('not-installed')) return undefined
    return /linux-image-(\S+-cloud-amd64)\b/.exec(depends)?.[1]
  } catch {
    // Not a dpkg system, or the metapackage is unknown: look in /boot instead.
    return undefined
  }
}

/** The package's version, or the file's mtime for a kernel put there by hand, so that the cache key still follows it. */
async function packageVersion (pkg: string, file: string): Promise<string> {
  try {
    const { stdout } = await run('dpkg-query', ['-W', '-f=${Version}', pkg])
    if (stdout.trim() !== '') return stdout.trim()
  } catch { /* not from a package */ }
  try {
    return `local${Math.round((await stat(file)).mtimeMs)}`
  } catch {
    return 'local'
  }
}

const COMPRESSED_SUFFIX: Record<string, Compression> = { '.xz': 'xz', '.zst': 'zstd', '.gz': 'gzip' }

/**
 * Copies the modules the guest needs into `workDir` in load order, each
 * decompressed if Debian ships it compressed: the init loads them with
 * finit_module(fd, "", 0), and in-kernel decompression would need both
 * CONFIG_MODULE_DECOMPRESS and a flag the init does not pass.
 */
async function collectModules (installed: Installed, workDir: string, finalDir: string): Promise<{ modules: GuestModule[], builtin: string[] }> {
  const modulesDep = await readFile(join(installed.modulesDir, 'modules.dep'), 'utf8')
  let modulesBuiltin = ''
  try { modulesBuiltin = await readFile(join(installed.modulesDir, 'modules.builtin'), 'utf8') } catch { /* older depmod: nothing is listed as built in */ }
  const resolved = resolveModuleLoadOrder(modulesDep, modulesBuiltin, [...REQUIRED_MODULES, ...OPTIONAL_MODULES])
  const lacking = resolved.missing.filter((name) => REQUIRED_MODULES.includes(name))
  if (lacking.length > 0) {
    throw new UigniterError('UIG_ERR_KERNEL_MODULE_MISSING',
      `${installed.package} has neither as a module nor built in: ${lacking.join(', ')}; the guest needs them. Use kernel.source "build" (uigniter kernel build)`)
  }
  const modules: GuestModule[] = []
  for (const relPath of resolved.load) {
    const suffix = /\.ko(\.(?:xz|zst|gz))?$/.exec(relPath)?.[1] ?? ''
    const plain = suffix === '' ? relPath : relPath.slice(0, -suffix.length)
    const from = join(installed.modulesDir, relPath)
    const to = join(workDir, plain)
    await mkdir(dirname(to), { recursive: true })
    const compression = COMPRESSED_SUFFIX[suffix]
    if (compression !== undefined) await decompressToFile(compression, await readFile(from), to)
    else await copyFile(from, to)
    modules.push({ hostPath: join(finalDir, plain), guestPath: posix.join('/lib/modules', installed.release, plain) })
  }
  return { modules, builtin: resolved.builtin }
}
