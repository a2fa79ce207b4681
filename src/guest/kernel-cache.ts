import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { mkdir, readFile, rename, rm, stat } from 'node:fs/promises'
import { cpus } from 'node:os'
import { join } from 'node:path'
import { packageRoot } from '../core/package-paths.js'
import { UigniterError, hasErrno, rethrowNoSpace } from '../core/errors.js'
import { run } from '../core/exec.js'
import { writeFileAtomic } from '../core/fs-atomic.js'
import { Progress } from '../core/progress.js'
import type { GuestKernel, KernelSource } from './kernel-source.js'
import { applySourceEdits, sourceEditsFingerprint } from './kernel/source-edits.js'
import { removeStaleWorkDirs } from './kernel-work-dirs.js'

const FRAGMENT_PATH = join(packageRoot, 'src/guest/kernel/config-fragment')
const SOURCE_TARBALL = '/usr/src/linux-source-6.1.tar.xz'
const SOURCE_PACKAGE = 'linux-source-6.1'
/** Bump when the build steps change in a way that changes the kernel. */
const RECIPE_VERSION = '1'

/** Our kernel: every driver built in, booted by PVH on microvm with virtio-mmio. */
export interface KernelInfo extends GuestKernel {
  source: 'build'
  builtAt: string
  buildSeconds: number
}

/** The fields of KernelInfo that are the same for every build, so info.json does not carry them. */
const FIXED = { modules: [], machines: [{ type: 'microvm', transport: 'mmio' }], extraMemoryMiB: 0 } satisfies Partial<KernelInfo>

/**
 * The guest kernel, built once per machine from Debian's linux-source-6.1 and
 * our config fragment, and cached under `<cacheDir>/kernels/<key>` where the
 * key is the source package version plus a hash of the fragment. A build
 * happens in a sibling temp dir that is renamed into place only when the
 * kernel is complete, so a failed or interrupted build leaves no entry.
 */
export class KernelCache implements KernelSource {
  readonly kind = 'build'
  readonly #dir: string

  constructor (cacheDir: string) {
    this.#dir = join(cacheDir, 'kernels')
  }

  /** `6.1.192-2-<12 hex of the hash of the fragment and the source edits>`. */
  async key (): Promise<string> {
    const version = await sourceVersion()
    const hash = createHash('sha256').update(RECIPE_VERSION).update(readFileSync(FRAGMENT_PATH)).update(sourceEditsFingerprint()).digest('hex').slice(0, 12)
    return `${version}-${hash}`
  }

  /** The cached kernel for the current key, or undefined. */
  async find (): Promise<KernelInfo | undefined> {
    const key = await this.key()
    try {
      return { ...JSON.parse(await readFile(join(this.#dir, key, 'info.json'), 'utf8')) as KernelInfo, ...FIXED }
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) return undefined
      throw new UigniterError('UIG_ERR_CONFIG_INVALID', `cannot read the kernel cache in ${this.#dir}: ${(err as Error).message}; set cacheDir (UIGNITER_CACHE_DIR) to a directory you can read`, { cause: err })
    }
  }

  /** The cached kernel; throws UIG_ERR_KERNEL_NOT_BUILT when there is none. */
  async get (): Promise<KernelInfo> {
    const found = await this.find()
    if (found === undefined) {
      throw new UigniterError('UIG_ERR_KERNEL_NOT_BUILT', 'the guest kernel is not built yet; run "uigniter kernel build" (a few minutes, once per machine)')
    }
    return found
  }

  /** Builds the kernel unless it is cached (or `force`), showing progress. */
  async build (options: { force?: boolean, onLog?: (line: string) => void } = {}): Promise<KernelInfo> {
    if (options.force !== true) {
      const cached = await this.find()
      if (cached !== undefined) return cached
    }
    await this.#removeStaleBuilds()
    const key = await this.key()
    const work = join(this.#dir, `.build-${process.pid}-${key}`)
    const progress = new Progress(`kernel ${key}`)
    try {
      await rm(work, { recursive: true, force: true })
      await mkdir(work, { recursive: true })
      progress.update('unpacking linux-source-6.1')
      await run('tar', ['-xf', SOURCE_TARBALL, '-C', work, '--strip-components=1'], { onFail: buildFailure('unpacking the kernel source') })
      const src = work
      await applySourceEdits(src)
      progress.update('configuring')
      await run('make', ['-C', src, 'tinyconfig'], { onFail: buildFailure('make tinyconfig') })
      await run(join(src, 'scripts/kconfig/merge_config.sh'), ['-m', '-O', src, join(src, '.config'), FRAGMENT_PATH],
        { cwd: src, onFail: buildFailure('merging the config fragment') })
      await run('make', ['-C', src, 'olddefconfig'], { onFail: buildFailure('make olddefconfig') })
      await verifyConfig(join(src, '.config'))
      let compiled = 0
      await run('make', ['-C', src, `-j${cpus().length}`, 'vmlinux'], {
        onLine: (line) => {
          options.onLog?.(line)
          if (/^\s+(CC|AS|LD|AR)\s/.test(line)) progress.update(`compiled ${++compiled} files`)
        },
        onFail: buildFailure('make vmlinux')
      })
      progress.update('stripping')
      const out = join(this.#dir, `.out-${process.pid}-${key}`)
      await rm(out, { recursive: true, force: true })
      await mkdir(out)
      await run('strip', ['--strip-debug', '-o', join(out, 'vmlinux'), join(src, 'vmlinux')], { onFail: buildFailure('strip') })
      await rename(join(src, '.config'), join(out, 'config'))
      const info: KernelInfo = {
        source: 'build',
        version: await sourceVersion(),
        key,
        path: join(this.#dir, key, 'vmlinux'),
        size: (await stat(join(out, 'vmlinux'))).size,
        builtAt: new Date().toISOString(),
        buildSeconds: Math.round(progress.elapsedMs / 1000),
        ...FIXED
      }
      await writeFileAtomic(join(out, 'info.json'), JSON.stringify(info, null, 2) + '\n')
      await rm(join(this.#dir, key), { recursive: true, force: true })
      await rename(out, join(this.#dir, key))
      progress.done()
      return info
    } catch (err) {
      progress.done()
      await rm(join(this.#dir, `.out-${process.pid}-${key}`), { recursive: true, force: true })
      rethrowNoSpace(err, this.#dir)
    } finally {
      await rm(work, { recursive: true, force: true })
    }
  }

  async #removeStaleBuilds (): Promise<void> {
    await removeStaleWorkDirs(this.#dir)
  }
}

function buildFailure (step: string) {
  return ({ stderr, stdout, code }: { stderr: string, stdout: string, code: number | null }): Error => {
    const tail = (stderr.trim() || stdout.trim()).split('\n').slice(-15).join('\n')
    if (/No space left on device/.test(tail)) {
      return new UigniterError('UIG_ERR_NO_SPACE', `no space left while ${step}; the kernel build needs about 2 GB free in the cache directory`)
    }
    return new UigniterError('UIG_ERR_KERNEL_BUILD_FAILED', `kernel build failed while ${step} (exit ${code}):\n${tail}`)
  }
}

/** Every option of the fragment must survive olddefconfig, or the guest cannot boot as designed. */
async function verifyConfig (configPath: string): Promise<void> {
  const actual = new Map<string, string>()
  for (const line of (await readFile(configPath, 'utf8')).split('\n')) {
    const set = /^(CONFIG_\w+)=(.*)$/.exec(line)
    if (set?.[1] !== undefined) actual.set(set[1], set[2] ?? '')
  }
  const wrong: string[] = []
  for (const line of readFileSync(FRAGMENT_PATH, 'utf8').split('\n')) {
    const want = /^(CONFIG_\w+)=(.*)$/.exec(line)
    const unset = /^# (CONFIG_\w+) is not set$/.exec(line)
    if (want?.[1] !== undefined && actual.get(want[1]) !== want[2]) wrong.push(`${want[1]}=${want[2] ?? ''} (got ${actual.get(want[1]) ?? 'unset'})`)
    if (unset?.[1] !== undefined && actual.has(unset[1])) wrong.push(`${unset[1]} should be unset (got ${actual.get(unset[1])})`)
  }
  if (wrong.length > 0) {
    throw new UigniterError('UIG_ERR_KERNEL_CONFIG_MISMATCH', `Kconfig did not keep these options of src/guest/kernel/config-fragment (a missing dependency?): ${wrong.join(', ')}`)
  }
}

async function sourceVersion (): Promise<string> {
  try {
    await stat(SOURCE_TARBALL)
  } catch {
    throw new UigniterError('UIG_ERR_HOST_MISSING_TOOL', `${SOURCE_TARBALL} is missing; install it with: apt-get install -y ${SOURCE_PACKAGE} flex bison bc libelf-dev`)
  }
  const { stdout } = await run('dpkg-query', ['-W', '-f=${Version}', SOURCE_PACKAGE])
  return stdout.trim()
}

