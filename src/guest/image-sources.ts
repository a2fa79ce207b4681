import { access, constants, lstat, stat } from 'node:fs/promises'
import { basename, join, posix, resolve } from 'node:path'
import { UigniterError, hasErrno } from '../core/errors.js'
import type { AfterClone, BuildSpec } from '../core/image.js'
import { packageRoot } from '../core/package-paths.js'
import { readElf } from './elf-file.js'
import { resolveLibraries } from './library-resolver.js'
import { RootfsTree } from './rootfs-tree.js'

/** What a source contributes to an image: its files, and how to start the app. */
export interface SourceContent {
  tree: RootfsTree
  argv: string[]
  workdir: string
  /** The app's environment the source needs, under the spec's own. */
  env?: Record<string, string>
  /** The source's after-clone hook and clone safety, when the spec names none. */
  afterClone?: AfterClone
  cloneSafe?: boolean
}

/** The clone-safety preload of node images (src/guest/node-clone-safe/clone-safe.cjs), and where images hold it. */
export const CLONE_SAFE_PRELOAD = join(packageRoot, 'src/guest/node-clone-safe/clone-safe.cjs')
export const CLONE_SAFE_GUEST_PATH = '/uigniter/clone-safe.cjs'

type AppSource = Exclude<BuildSpec['source'], { kind: 'unikernel' }>

/**
 * Turns a build source (an ELF, a Node.js app, a root directory) into a file
 * tree and an argv. Relative host paths are taken from `baseDir` (the spec
 * file's directory, or the working directory for CLI flags).
 */
export async function loadSource (source: AppSource, baseDir: string, options: { cloneSafe?: boolean } = {}): Promise<SourceContent> {
  switch (source.kind) {
    case 'elf': return await fromElf(resolve(baseDir, source.path), source.args)
    case 'node': return await fromNodeApp(resolve(baseDir, source.dir), source.entry, source.args, options.cloneSafe !== false)
    case 'rootfs': return await fromRootfs(resolve(baseDir, source.dir), source.entrypoint, source.args, source.owners === 'keep')
  }
}

/** Checks that a host path exists and is readable, with the codes the builder promises. */
export async function checkReadable (path: string, what: string): Promise<void> {
  try {
    await access(path, constants.R_OK)
  } catch (err) {
    if (hasErrno(err, 'ENOENT', 'ENOTDIR')) throw new UigniterError('UIG_ERR_IMAGE_PATH_NOT_FOUND', `${what} ${path} does not exist`, { cause: err })
    throw new UigniterError('UIG_ERR_IMAGE_PATH_UNREADABLE', `${what} ${path} cannot be read: ${(err as Error).message}`, { cause: err })
  }
}

/** Adds an executable and the shared libraries it needs, at the paths the loader will look for them. */
async function addExecutable (tree: RootfsTree, hostPath: string, guestPath: string): Promise<void> {
  await checkReadable(hostPath, 'executable')
  const elf = await readElf(hostPath)
  if (elf.type === 'other') {
    throw new UigniterError('UIG_ERR_IMAGE_NOT_ELF', `${hostPath} is an ELF file but not an executable (a relocatable object or core dump?)`)
  }
  const info = await stat(hostPath)
  tree.addFile(guestPath, { hostPath, size: info.size }, 0o755)
  for (const lib of await resolveLibraries(hostPath)) {
    tree.addFile(lib.guestPath, { hostPath: lib.hostPath, size: (await stat(lib.hostPath)).size }, 0o755)
  }
}

async function fromElf (path: string, args: string[]): Promise<SourceContent> {
  const tree = new RootfsTree()
  const guestPath = posix.join('/usr/bin', basename(path))
  await addExecutable(tree, path, guestPath)
  return { tree, argv: [guestPath, ...args], workdir: '/' }
}

/**
 * A Node.js app: the host's node and the app at /app. Unless the spec says
 * `cloneSafe: false`, also the clone-safety preload, loaded through
 * NODE_OPTIONS (which, unlike argv, survives a VM's `args`), and its
 * after-clone hook: SIGUSR2, which the preload answers once it has rekeyed.
 */
async function fromNodeApp (dir: string, entry: string, args: string[], cloneSafe: boolean): Promise<SourceContent> {
  await checkDirectory(dir, 'Node.js app directory')
  const entryPath = resolve(dir, entry)
  if (!entryPath.startsWith(dir + '/')) {
    throw new UigniterError('UIG_ERR_IMAGE_NO_ENTRYPOINT', `entry ${entry} is outside the app directory ${dir}`)
  }
  await requireFile(entryPath, `entry script ${entry} is missing from ${dir}`)
  const tree = new RootfsTree()
  await addExecutable(tree, process.execPath, '/usr/bin/node')
  await tree.addHostDirectory(dir, '/app')
  const content: SourceContent = { tree, argv: ['/usr/bin/node', posix.join('/app', entry), ...args], workdir: '/app' }
  if (!cloneSafe) return content
  await checkReadable(CLONE_SAFE_PRELOAD, 'the clone-safety preload')
  tree.addFile(CLONE_SAFE_GUEST_PATH, { hostPath: CLONE_SAFE_PRELOAD, size: (await stat(CLONE_SAFE_PRELOAD)).size }, 0o644)
  return { ...content, env: { NODE_OPTIONS: `--require ${CLONE_SAFE_GUEST_PATH}` }, afterClone: { kind: 'signal', signal: 'SIGUSR2' }, cloneSafe: true }
}

async function fromRootfs (dir: string, entrypoint: string, args: string[], keepOwners: boolean): Promise<SourceContent> {
  await checkDirectory(dir, 'root file system directory')
  const hostEntry = resolve(dir, '.' + entrypoint)
  await requireFile(hostEntry, `entrypoint ${entrypoint} is missing from ${dir}`)
  try {
    await access(hostEntry, constants.X_OK)
  } catch {
    throw new UigniterError('UIG_ERR_IMAGE_NO_ENTRYPOINT', `entrypoint ${entrypoint} in ${dir} is not executable; chmod +x it`)
  }
  const tree = new RootfsTree()
  await tree.addHostDirectory(dir, '/', { owners: keepOwners })
  return { tree, argv: [entrypoint, ...args], workdir: '/' }
}

async function checkDirectory (dir: string, what: string): Promise<void> {
  await checkReadable(dir, what)
  if (!(await stat(dir)).isDirectory()) {
    throw new UigniterError('UIG_ERR_IMAGE_PATH_NOT_FOUND', `${what} ${dir} is not a directory`)
  }
}

async function requireFile (path: string, message: string): Promise<void> {
  try {
    // lstat then stat: a dangling symlink counts as missing.
    await lstat(path)
    if ((await stat(path)).isFile()) return
  } catch (err) {
    if (!hasErrno(err, 'ENOENT', 'ENOTDIR')) throw err
  }
  throw new UigniterError('UIG_ERR_IMAGE_NO_ENTRYPOINT', message)
}
