import { chown, mkdir, mkdtemp, open, readdir, readFile, rename, rm, stat, unlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { hasErrno } from '../../src/core/errors.js'
import { run } from '../../src/core/exec.js'
import { createLayout, pushImage, type OciLayout } from './oci-images.js'

/**
 * Real Debian images for the OCI tests and the pull benchmark (issue 13):
 * one bookworm root made by debootstrap (minbase, python3 and
 * redis-server, about 120 MB unpacked), cached per machine as the guest
 * kernel is, and two images made of it with umoci: `python` (python3 -m
 * http.server as www-data) and `redis` (redis-server as redis, append-only
 * with fsync at every write, into /data).
 */

export const DEBIAN_SUITE = 'bookworm'
export const DEBIAN_MIRROR = 'http://deb.debian.org/debian'
/** python3, not python3-minimal: -m http.server is in the standard library (libpython3.11-stdlib), which -minimal lacks. */
export const DEBIAN_PACKAGES = ['python3', 'redis-server']

/** Where the root's tar is kept between runs; UIGNITER_ROOTFS_CACHE moves it (a machine without /var/cache rights). */
export function rootfsCacheDir (): string {
  return process.env.UIGNITER_ROOTFS_CACHE ?? '/var/cache/uigniter/rootfs'
}

/** Named after what it holds, so that another package list is another cache entry. */
const ROOTFS_NAME = `${DEBIAN_SUITE}-${DEBIAN_PACKAGES.join('+')}`
/** A lock held this long is a build that hung (debootstrap takes 1–5 minutes on this kind of machine). */
const BUILD_DEADLINE_MS = 30 * 60_000

/** What debootstrap leaves that no image needs: apt's lists and downloaded debs, docs, man pages, translations, logs. */
const PRUNED = ['var/lib/apt/lists', 'var/cache/apt', 'var/cache/debconf/templates.dat-old', 'usr/share/doc', 'usr/share/man', 'usr/share/info', 'usr/share/locale', 'var/log']

/**
 * The path of the cached tar of the Debian root, made first when it is not
 * there: debootstrap into a temporary dir beside the cache, pruned, tarred
 * with numeric owners and xattrs, then renamed into place, so that a build
 * that dies leaves no half tar. A lock file (holding its builder's pid) keeps
 * two test processes from building it at once; the second waits for the
 * first's tar. Quiet unless stderr is a terminal, where debootstrap's lines
 * show.
 * @example
 * const tar = await debianRootfsTar() // /var/cache/uigniter/rootfs/bookworm-python3+redis-server.tar
 */
export async function debianRootfsTar (): Promise<string> {
  const dir = rootfsCacheDir()
  const tar = join(dir, `${ROOTFS_NAME}.tar`)
  await mkdir(dir, { recursive: true })
  const deadline = Date.now() + BUILD_DEADLINE_MS
  for (;;) {
    if (await exists(tar)) return tar
    const lock = await takeLock(join(dir, `${ROOTFS_NAME}.lock`))
    if (lock !== undefined) {
      try {
        if (!await exists(tar)) await buildRootfsTar(dir, tar)
        return tar
      } finally {
        await lock()
      }
    }
    if (Date.now() > deadline) throw new Error(`the Debian root ${tar} was not made within ${BUILD_DEADLINE_MS / 60_000} minutes by the process holding its lock`)
    // Another process builds it; there is no event to wait on across processes, so look again in a while.
    await sleep(2000)
  }
}

async function exists (path: string): Promise<boolean> {
  try {
    await stat(path)
    return true
  } catch (err) {
    if (hasErrno(err, 'ENOENT')) return false
    throw err
  }
}

/** Takes the lock and returns its release, or undefined when a live process holds it (a dead one's is taken over). */
async function takeLock (path: string): Promise<(() => Promise<void>) | undefined> {
  try {
    const handle = await open(path, 'wx')
    await handle.writeFile(String(process.pid))
    await handle.close()
    return async () => { await unlink(path).catch(() => {}) }
  } catch (err) {
    if (!hasErrno(err, 'EEXIST')) throw err
  }
  const holder = Number((await readFile(path, 'utf8').catch(() => '')).trim())
  if (Number.isInteger(holder) && holder > 0 && isAlive(holder)) return undefined
  // Its holder died (or had not written its pid yet, which a second look settles): take it over.
  await sleep(200)
  const again = Number((await readFile(path, 'utf8').catch(() => '')).trim())
  if (again !== holder) return undefined
  await unlink(path).catch(() => {})
  return await takeLock(path)
}

function isAlive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return hasErrno(err, 'EPERM')
  }
}

async function buildRootfsTar (dir: string, tar: string): Promise<void> {
  // Under the lock, a build dir left is one whose builder was killed: it goes.
  for (const entry of await readdir(dir)) {
    if (entry.startsWith(`.${ROOTFS_NAME}-`)) await rm(join(dir, entry), { recursive: true, force: true })
  }
  // Beside the cache, so that the final rename stays on one file system.
  const work = await mkdtemp(join(dir, `.${ROOTFS_NAME}-`))
  try {
    const root = join(work, 'root')
    const say = process.stderr.isTTY ? (text: string): void => { process.stderr.write(`${text}\n`) } : undefined
    say?.(`making the Debian root ${tar} (debootstrap ${DEBIAN_SUITE}, once per machine)`)
    await run('debootstrap', ['--variant=minbase', `--include=${DEBIAN_PACKAGES.join(',')}`, DEBIAN_SUITE, root, DEBIAN_MIRROR], {
      ...(say !== undefined ? { onLine: say } : {}),
      keepTail: 20_000
    })
    for (const path of PRUNED) await rm(join(root, path), { recursive: true, force: true })
    // Recreate the emptied directories apt and daemons expect to find.
    for (const path of ['var/lib/apt/lists/partial', 'var/cache/apt/archives/partial', 'var/log']) await mkdir(join(root, path), { recursive: true })
    const partial = join(work, 'root.tar')
    await run('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=security.capability', '-C', root, '-cf', partial, '.'])
    await rename(partial, tar)
  } finally {
    await rm(work, { recursive: true, force: true })
  }
}

export type DebianImageKind = 'python' | 'redis'

/** What the python image serves from its WorkingDir. */
export const PYTHON_INDEX = 'served by python3 from a Debian image\n'
export const PYTHON_PORT = 8000
/** www-data in Debian's base-passwd. */
export const PYTHON_USER = { name: 'www-data', uid: 33, gid: 33 }
export const REDIS_PORT = 6379
export const REDIS_ARGS = ['--appendonly', 'yes', '--appendfsync', 'always', '--dir', '/data', '--port', String(REDIS_PORT), '--protected-mode', 'no', '--bind', '0.0.0.0']

/**
 * The python image's entrypoint: before python starts, the shell that
 * becomes it (exec keeps its pid) copies the Uid and Gid lines of its own
 * /proc/PID/status into the served directory, so that a GET shows which
 * user the app process runs as. Then Cmd runs as given, also on a
 * read-only root (no overlay), where the copy fails.
 */
export const PYTHON_ENTRYPOINT = ['/bin/sh', '-c', 'grep -E "^(Uid|Gid):" /proc/$$/status > whoami.txt; exec "$@"', 'serve']

/** As Debian's own images set it: the python image's shell finds python3 through it. */
const DEBIAN_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

/** A layout holding the Debian root as one base layer (tag `base`) and the images of it, made once per process. */
let layoutMade: Promise<OciLayout> | undefined

/**
 * An OCI layout with the tags `python` and `redis`, both on one base layer
 * (the Debian root) plus a small layer of their own. Made once per process;
 * the process exit removes nothing, so call closeDebianLayout() in an after
 * hook.
 */
export async function debianLayout (): Promise<OciLayout> {
  layoutMade ??= makeLayout()
  return await layoutMade
}

export async function closeDebianLayout (): Promise<void> {
  const made = layoutMade
  layoutMade = undefined
  if (made !== undefined) await (await made).close()
}

async function makeLayout (): Promise<OciLayout> {
  const tar = await debianRootfsTar()
  const layout = await createLayout()
  try {
    await run('umoci', ['new', '--image', `${layout.dir}:base`])
    // Unpacked and repacked as root (the tests run as root): the root's owners (redis, www-data) go into the layer as they are.
    await withBundle(layout, 'base', async (rootfs) => {
      await run('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=security.capability', '-xpf', tar, '-C', rootfs])
    })
    await run('umoci', ['tag', '--image', `${layout.dir}:base`, 'python'])
    await withBundle(layout, 'python', async (rootfs) => {
      const www = join(rootfs, 'srv/www')
      await mkdir(www, { recursive: true })
      await writeFile(join(www, 'index.html'), PYTHON_INDEX)
      // The app writes whoami.txt here as www-data.
      await chown(www, PYTHON_USER.uid, PYTHON_USER.gid)
    })
    await run('umoci', ['config', '--image', `${layout.dir}:python`, '--config.env', DEBIAN_PATH,
      ...PYTHON_ENTRYPOINT.flatMap((e) => ['--config.entrypoint', e]),
      '--config.cmd', 'python3', '--config.cmd', '-m', '--config.cmd', 'http.server', '--config.cmd', String(PYTHON_PORT),
      '--config.workingdir', '/srv/www', '--config.user', PYTHON_USER.name, '--config.exposedports', `${PYTHON_PORT}/tcp`])
    await run('umoci', ['tag', '--image', `${layout.dir}:base`, 'redis'])
    await withBundle(layout, 'redis', async (rootfs) => {
      const redis = passwdEntry(await readFile(join(rootfs, 'etc/passwd'), 'utf8'), 'redis')
      await mkdir(join(rootfs, 'data'), { recursive: true })
      await chown(join(rootfs, 'data'), redis.uid, redis.gid)
    })
    await run('umoci', ['config', '--image', `${layout.dir}:redis`, '--config.env', DEBIAN_PATH,
      '--config.entrypoint', '/usr/bin/redis-server', ...REDIS_ARGS.flatMap((a) => ['--config.entrypoint', a]),
      '--config.workingdir', '/data', '--config.user', 'redis', '--config.exposedports', `${REDIS_PORT}/tcp`])
    return layout
  } catch (err) {
    await layout.close()
    throw err
  }
}

/** Unpacks `tag` into a bundle, lets `change` write into its rootfs, and repacks what changed as a new layer of `tag`. */
async function withBundle (layout: OciLayout, tag: string, change: (rootfs: string) => Promise<void>): Promise<void> {
  const parent = await mkdtemp(join(tmpdir(), 'uigniter-debian-bundle-'))
  const bundle = join(parent, 'bundle')
  try {
    await run('umoci', ['unpack', '--image', `${layout.dir}:${tag}`, bundle])
    await change(join(bundle, 'rootfs'))
    await run('umoci', ['repack', '--image', `${layout.dir}:${tag}`, bundle])
  } finally {
    await rm(parent, { recursive: true, force: true })
  }
}

function passwdEntry (passwd: string, name: string): { uid: number, gid: number } {
  const fields = passwd.split('\n').map((l) => l.split(':')).find((f) => f[0] === name)
  if (fields === undefined) throw new Error(`the Debian root has no user ${name} in /etc/passwd`)
  return { uid: Number(fields[2]), gid: Number(fields[3]) }
}

/**
 * Pushes the `kind` image to a registry as NAME:TAG (default `kind:bookworm`)
 * and returns the reference to pull it by (`127.0.0.1:PORT/redis:bookworm`).
 * The layout is made on the first call (and the Debian root on the first
 * run on this machine: minutes); a push of a made layout takes seconds.
 * @example
 * const registry = await startRegistry()
 * const ref = await pushDebianImage(registry, 'redis')
 */
export async function pushDebianImage (registry: { host: string }, kind: DebianImageKind, options: { name?: string, tag?: string } = {}): Promise<string> {
  const nameAndTag = `${options.name ?? kind}:${options.tag ?? DEBIAN_SUITE}`
  await pushImage(await debianLayout(), kind, registry.host, nameAndTag)
  return `${registry.host}/${nameAndTag}`
}

/** Unpacks the cached Debian root into `dir` (for a `--rootfs` build of the same root). */
export async function unpackDebianRootfs (dir: string): Promise<void> {
  await mkdir(dir, { recursive: true })
  await run('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=security.capability', '-xpf', await debianRootfsTar(), '-C', dir])
}

