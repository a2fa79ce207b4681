/**
 * Finds the files a dynamically linked x86-64 program needs at run time (its
 * ELF interpreter and shared libraries, transitively), the way glibc's ld.so
 * would find them on this host, so the image builder can copy them into the
 * guest. Nothing is executed: `ldd` runs the program's interpreter, which is
 * not safe for untrusted binaries, so the ELF files are parsed instead.
 */

import { readFile, readdir, realpath } from 'node:fs/promises'
import { dirname, isAbsolute, join, resolve } from 'node:path'

import { UigniterError, hasErrno } from '../core/errors.js'
import { readElf, type ElfInfo } from './elf-file.js'

/** A file the guest needs: where the program will look for it, and where its content is on the host. */
export interface ResolvedLibrary {
  /** Absolute path the dynamic loader uses in the guest, e.g. `/lib/x86_64-linux-gnu/libc.so.6`. */
  guestPath: string
  /** realpath of the file on the host whose content belongs at `guestPath`. */
  hostPath: string
}

/** Options for {@link resolveLibraries}. */
export interface ResolveLibrariesOptions {
  /** Extra directories, searched after DT_RPATH/DT_RUNPATH and before the system directories. */
  searchPaths?: string[]
  /** The ld.so configuration file to read system directories from; defaults to `/etc/ld.so.conf`. */
  ldSoConf?: string
}

// glibc's built-in trusted directories on Debian's multiarch x86-64, searched last.
const DEFAULT_DIRS = [
  '/lib/x86_64-linux-gnu',
  '/usr/lib/x86_64-linux-gnu',
  '/lib64',
  '/usr/lib64',
  '/lib',
  '/usr/lib'
]

const DEFAULT_LD_SO_CONF = '/etc/ld.so.conf'

/** An ELF object already taken into the closure, and what ld.so would know about it. */
interface LoadedObject {
  /** The path the object is known by (the executable's path, or a library's guest path). */
  path: string
  /** What `$ORIGIN` expands to in this object's RPATH/RUNPATH/NEEDED. */
  origin: string
  info: ElfInfo
  /** The object whose DT_NEEDED brought this one in; ld.so walks this chain for DT_RPATH. */
  loader?: LoadedObject
}

/**
 * Lists the ELF interpreter and every shared library `executable` needs,
 * transitively, each once, in the order ld.so would load them (interpreter
 * first, then breadth-first over DT_NEEDED).
 *
 * Search order for a needed name without a slash, as in ld.so: DT_RPATH of the
 * requesting object and of the objects that loaded it (ignored for any object
 * with DT_RUNPATH, and entirely when the requester has DT_RUNPATH), the
 * requester's DT_RUNPATH, `options.searchPaths`, the directories listed in
 * ld.so.conf (following `include`), then the built-in defaults. `$ORIGIN` and
 * `${ORIGIN}` expand to the requesting object's directory (for the executable,
 * the directory of its realpath). Paths are normalised lexically. A candidate
 * that is not an x86-64 ELF file is skipped. LD_LIBRARY_PATH is ignored: the
 * host's environment says nothing about the guest's.
 *
 * @param executable - the program to inspect.
 * @param options - extra search directories and the ld.so.conf to read.
 * @returns the files to copy; `[]` for a statically linked executable.
 * @throws UigniterError UIG_ERR_IMAGE_LIBRARY_NOT_FOUND when the interpreter or
 *   a needed library cannot be found, naming it, who needs it and where it
 *   looked; the errors of {@link readElf} for the executable itself.
 */
export async function resolveLibraries (executable: string, options: ResolveLibrariesOptions = {}): Promise<ResolvedLibrary[]> {
  const exeInfo = await readElf(executable)
  // ld.so takes the executable's $ORIGIN from /proc/self/exe, which is
  // symlink-free; mirror that so a symlinked launcher finds its libraries.
  const exeReal = await realpath(executable)
  const root: LoadedObject = { path: executable, origin: dirname(exeReal), info: exeInfo }

  const resolver = new Resolver(
    (options.searchPaths ?? []).map((dir) => resolve(dir)),
    await readLdSoConfDirs(options.ldSoConf ?? DEFAULT_LD_SO_CONF)
  )
  return await resolver.run(root)
}

class Resolver {
  private readonly results: ResolvedLibrary[] = []
  /** Guest paths already in `results`. */
  private readonly listed = new Set<string>()
  /** Host files whose dependencies are already queued. */
  private readonly expanded = new Set<string>()
  /**
   * Names ld.so would consider already loaded: every needed name resolved so
   * far, every loaded object's path and every DT_SONAME. A DT_NEEDED that
   * matches one of these is not searched again, exactly as in ld.so (this is
   * why libc's NEEDED on ld-linux-x86-64.so.2 does not add a second copy).
   */
  private readonly loadedNames = new Set<string>()
  private readonly elfCache = new Map<string, ElfInfo | null>()
  /** Files that exist but were skipped, with the reason, so a "not found" error can say why. */
  private readonly rejected = new Map<string, string>()

  constructor (
    private readonly extraDirs: string[],
    private readonly systemDirs: string[]
  ) {}

  async run (root: LoadedObject): Promise<ResolvedLibrary[]> {
    this.loadedNames.add(root.path)
    if (root.info.soname !== undefined) this.loadedNames.add(root.info.soname)
    if (root.info.interpreter !== undefined) await this.addInterpreter(root.info.interpreter, root)

    const queue: LoadedObject[] = [root]
    for (let object = queue.shift(); object !== undefined; object = queue.shift()) {
      for (const name of object.info.needed) {
        if (this.loadedNames.has(name)) continue
        const found = await this.find(name, object)
        this.loadedNames.add(name)
        this.loadedNames.add(found.path)
        if (found.info.soname !== undefined) this.loadedNames.add(found.info.soname)
        const hostPath = await realpath(found.path)
        this.list(found.path, hostPath)
        // Two names can lead to one file (a symlinked soname and dev name);
        // its own dependencies only need walking once.
        if (!this.expanded.has(hostPath)) {
          this.expanded.add(hostPath)
          queue.push({ path: found.path, origin: dirname(found.path), info: found.info, loader: object })
        }
      }
    }
    return this.results
  }

  private async addInterpreter (interpreter: string, root: LoadedObject): Promise<void> {
    const guestPath = resolve(interpreter)
    const info = await this.tryElf(guestPath)
    if (info === null) {
      const reason = this.rejected.get(guestPath) ?? `${guestPath} does not exist`
      throw new UigniterError('UIG_ERR_IMAGE_LIBRARY_NOT_FOUND',
        `the ELF interpreter ${interpreter} (needed by ${root.path}) cannot be used: ${reason}; ` +
        'install the C library the program was built for')
    }
    this.loadedNames.add(interpreter)
    this.loadedNames.add(guestPath)
    if (info.soname !== undefined) this.loadedNames.add(info.soname)
    this.list(guestPath, await realpath(guestPath))
  }

  private list (guestPath: string, hostPath: string): void {
    if (this.listed.has(guestPath)) return
    this.listed.add(guestPath)
    this.results.push({ guestPath, hostPath })
  }

  private async find (name: string, requester: LoadedObject): Promise<{ path: string; info: ElfInfo }> {
    // ld.so expands $ORIGIN in DT_NEEDED too, and takes a name with a slash as
    // a path (a relative one from the current directory, as ld.so would).
    const expanded = expandOrigin(name, requester.origin)
    const candidates = expanded.includes('/')
      ? [resolve(expanded)]
      : this.searchDirs(requester).map((dir) => join(dir, name))

    const skipped: string[] = []
    for (const candidate of candidates) {
      const info = await this.tryElf(candidate)
      if (info !== null) return { path: candidate, info }
      if (this.rejected.has(candidate)) skipped.push(candidate)
    }

    const where = expanded.includes('/') ? candidates : candidates.map((c) => dirname(c))
    const skippedNote = skipped.length > 0 ? `; skipped as not x86-64 ELF files: ${skipped.join(', ')}` : ''
    throw new UigniterError('UIG_ERR_IMAGE_LIBRARY_NOT_FOUND',
      `${name} (needed by ${requester.path}) was not found in: ${where.join(', ')}${skippedNote}; ` +
      'install the package that provides it or pass its directory')
  }

  /** The directories to search for a name `requester` needs, in ld.so's order, without repeats. */
  private searchDirs (requester: LoadedObject): string[] {
    const dirs: string[] = []
    if (requester.info.runpath.length === 0) {
      for (let object: LoadedObject | undefined = requester; object !== undefined; object = object.loader) {
        // An object with DT_RUNPATH has its DT_RPATH ignored by ld.so.
        if (object.info.runpath.length > 0) continue
        const origin = object.origin
        dirs.push(...object.info.rpath.map((dir) => resolve(expandOrigin(dir, origin))))
      }
    }
    dirs.push(...requester.info.runpath.map((dir) => resolve(expandOrigin(dir, requester.origin))))
    dirs.push(...this.extraDirs, ...this.systemDirs, ...DEFAULT_DIRS)
    return [...new Set(dirs)]
  }

  /** The parsed file, or null when it is missing, unreadable or not an x86-64 ELF file (ld.so skips those). */
  private async tryElf (path: string): Promise<ElfInfo | null> {
    const cached = this.elfCache.get(path)
    if (cached !== undefined) return cached
    let info: ElfInfo | null
    try {
      info = await readElf(path)
    } catch (err) {
      if (!(err instanceof UigniterError)) throw err
      if (err.code !== 'UIG_ERR_IMAGE_PATH_NOT_FOUND') this.rejected.set(path, err.message)
      info = null
    }
    this.elfCache.set(path, info)
    return info
  }
}

/** Replaces `$ORIGIN` and `${ORIGIN}` (but not `$ORIGINAL`) with the object's directory. */
function expandOrigin (value: string, origin: string): string {
  return value.replace(/\$\{ORIGIN\}|\$ORIGIN(?![A-Za-z0-9_])/g, origin)
}

/**
 * The library directories listed in an ld.so.conf, in order, following
 * `include` lines (glob patterns, relative to the including file's
 * directory) and ignoring comments and `hwcap` lines, as ldconfig does. A
 * missing or unreadable file contributes nothing: the built-in defaults
 * still apply.
 */
async function readLdSoConfDirs (file: string, visited = new Set<string>()): Promise<string[]> {
  if (visited.has(file)) return []
  visited.add(file)
  let text: string
  try {
    text = await readFile(file, 'utf8')
  } catch (err) {
    if (hasErrno(err, 'ENOENT', 'ENOTDIR', 'EACCES', 'EISDIR')) return []
    throw err
  }

  const dirs: string[] = []
  for (const rawLine of text.split('\n')) {
    const line = (rawLine.split('#')[0] ?? '').trim()
    if (line === '') continue
    const include = /^include\s+(.*)$/.exec(line)
    if (include !== null) {
      for (const pattern of (include[1] ?? '').split(/\s+/).filter((p) => p !== '')) {
        const absolute = isAbsolute(pattern) ? pattern : join(dirname(file), pattern)
        for (const included of await expandGlob(absolute)) {
          dirs.push(...await readLdSoConfDirs(included, visited))
        }
      }
      continue
    }
    if (/^hwcap\s/i.test(line)) continue
    // Old-style "dir=libc5" lines carry a library type after '='.
    const dir = line.replace(/=(libc4|libc5|libc6|glibc)$/, '').trim()
    // ldconfig ignores relative directories; so does ld.so's cache.
    if (isAbsolute(dir)) dirs.push(resolve(dir))
  }
  return dirs
}

/**
 * Expands an absolute glob pattern (`*`, `?`, `[...]`) to the matching paths,
 * sorted, like glob(3) as ldconfig uses it. Node 20 has no fs.glob, and the
 * patterns in ld.so.conf are simple enough for a per-component match.
 */
async function expandGlob (pattern: string): Promise<string[]> {
  let paths = ['/']
  for (const part of pattern.split('/').filter((p) => p !== '')) {
    const next: string[] = []
    if (!/[*?[]/.test(part)) {
      for (const base of paths) next.push(join(base, part))
    } else {
      const matcher = globPartToRegExp(part)
      for (const base of paths) {
        let entries: string[]
        try {
          entries = await readdir(base)
        } catch {
          continue
        }
        for (const entry of entries) {
          // glob(3) does not let wildcards match a leading dot.
          if (entry.startsWith('.') && !part.startsWith('.')) continue
          if (matcher.test(entry)) next.push(join(base, entry))
        }
      }
    }
    paths = next
  }
  return paths.sort()
}

function globPartToRegExp (part: string): RegExp {
  let source = ''
  for (let i = 0; i < part.length; i++) {
    const char = part[i] ?? ''
    if (char === '*') {
      source += '.*'
    } else if (char === '?') {
      source += '.'
    } else if (char === '[') {
      // A ']' right after '[' or '[!' is a member, not the end of the class.
      let end = i + 1
      if (part[end] === '!' || part[end] === '^') end++
      if (part[end] === ']') end++
      end = part.indexOf(']', end)
      if (end < 0) {
        source += '\\['
        continue
      }
      let body = part.slice(i + 1, end)
      const negate = body.startsWith('!') || body.startsWith('^')
      if (negate) body = body.slice(1)
      source += `[${negate ? '^' : ''}${body.replace(/[\\\]^]/g, '\\$&')}]`
      i = end
    } else {
      source += char.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')
    }
  }
  return new RegExp(`^${source}$`, 's')
}
