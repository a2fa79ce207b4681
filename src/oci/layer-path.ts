import { lstat, readlink } from 'node:fs/promises'
import { join } from 'node:path'
import { hasErrno } from '../core/errors.js'

/**
 * Splits a tar entry name into path components below the root, or returns
 * why it cannot be one. "./" prefixes and empty or "." components are
 * dropped (every tar writer produces them); any ".." is refused rather than
 * resolved, and so is an absolute name, although GNU tar would strip its
 * slash: in a layer neither is produced by a honest writer.
 */
export function entryComponents (name: string): string[] | { refused: string } {
  if (name.includes('\0')) return { refused: 'has a NUL byte in its name' }
  if (name.startsWith('/')) return { refused: 'is an absolute path' }
  const parts = name.split('/').filter((p) => p !== '' && p !== '.')
  if (parts.includes('..')) return { refused: 'has a ".." component (it would escape the root)' }
  return parts
}

const MAX_SYMLINK_HOPS = 40

/**
 * Resolves `path` (absolute, as the guest sees it) inside `root` the way the
 * guest would, with `root` as "/": symlinks are followed but an absolute or
 * "../" target never leaves `root`. Returns the host path, or null when a
 * component is missing. For reading an applied tree (its /etc/passwd, its
 * PATH): a plain open() would follow an image's absolute symlink onto the host.
 */
export async function resolveInRoot (root: string, path: string): Promise<string | null> {
  let pending = path.split('/').filter((p) => p !== '' && p !== '.')
  const done: string[] = []
  let hops = 0
  while (pending.length > 0) {
    const part = pending.shift() as string
    if (part === '..') { done.pop(); continue }
    const host = join(root, ...done, part)
    let st
    try {
      st = await lstat(host)
    } catch (err) {
      if (hasErrno(err, 'ENOENT', 'ENOTDIR')) return null
      throw err
    }
    if (!st.isSymbolicLink()) { done.push(part); continue }
    if (++hops > MAX_SYMLINK_HOPS) return null
    const target = await readlink(host)
    if (target.startsWith('/')) done.length = 0
    pending = [...target.split('/').filter((p) => p !== '' && p !== '.'), ...pending]
  }
  return join(root, ...done)
}
