import { createWriteStream } from 'node:fs'
import { chmod, copyFile, constants, lchown, mkdir, symlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { createGzip } from 'node:zlib'
import { UigniterError } from '../core/errors.js'
import { run } from '../core/exec.js'
import { CpioWriter } from './cpio-writer.js'
import type { RootfsTree } from './rootfs-tree.js'
import { allocateFile } from './image-store.js'

/** Writes the tree as a gzip-compressed cpio (newc) archive: an initramfs. */
export async function writeInitramfs (tree: RootfsTree, outPath: string): Promise<void> {
  const gzip = createGzip({ level: 6 })
  const flushed = pipeline(gzip, createWriteStream(outPath))
  const cpio = new CpioWriter(gzip)
  const written = (async () => {
    for (const [path, entry] of tree.entries()) {
      if (path === '/') continue
      const name = path.slice(1)
      if (entry.type === 'dir') await cpio.addDirectory(name, entry.mode)
      else if (entry.type === 'symlink') await cpio.addSymlink(name, entry.target)
      else await cpio.addFile(name, entry.source, entry.mode)
    }
    await cpio.close()
  })()
  // A full disk fails the file stream first; the writer may then wait for a
  // 'drain' that never comes, so the pipeline's error must win the race.
  written.catch(() => {})
  await Promise.all([written, flushed])
}

/**
 * Writes the tree as a read-only root disk. The tree is first laid out in a
 * staging directory (file copies use reflinks where the file system has them),
 * then packed: squashfs with zstd (smaller, read-only by design), or ext4
 * without a journal (a read-only mount needs none).
 */
export async function writeDisk (tree: RootfsTree, format: 'squashfs' | 'ext4', stagingDir: string, outPath: string): Promise<void> {
  await mkdir(stagingDir, { recursive: true })
  for (const [path, entry] of tree.entries()) {
    const target = join(stagingDir, path)
    if (entry.type === 'dir') {
      await mkdir(target, { recursive: true })
    } else if (entry.type === 'symlink') {
      await symlink(entry.target, target)
    } else {
      if ('hostPath' in entry.source) await copyFile(entry.source.hostPath, target, constants.COPYFILE_FICLONE)
      else await writeFile(target, entry.source.data)
    }
    // The owner before the mode: a chown clears setuid and setgid bits.
    if (entry.owner !== undefined) await lchown(target, entry.owner.uid, entry.owner.gid)
    if (entry.type !== 'symlink') await chmod(target, entry.mode)
  }
  if (tree.keepsCapabilities) await copyCapabilities(tree, stagingDir)
  const fail = (tool: string) => ({ stderr, stdout }: { stderr: string, stdout: string }): Error => {
    const text = (stderr + stdout).trim()
    if (/No space left|ENOSPC|Could not allocate|Failed to write|write failed/i.test(text)) {
      return new UigniterError('UIG_ERR_NO_SPACE', `no space left while writing the ${format} disk with ${tool}`)
    }
    return new Error(`${tool} failed: ${text.split('\n').slice(-5).join('\n')}`)
  }
  if (format === 'squashfs') {
    // Owners are root's unless the tree keeps its own (an image pulled from a registry).
    await run('mksquashfs', [stagingDir, outPath, '-comp', 'zstd', '-noappend', ...(tree.keepsOwners ? [] : ['-all-root']), '-no-progress', '-quiet'], { onFail: fail('mksquashfs') })
  } else {
    // Room for the content plus ext4's metadata: 25 % and 16 MiB is ample for read-only images.
    const size = Math.ceil((tree.contentSize() * 1.25 + 16 * 1024 * 1024) / 4096) * 4096
    await allocateFile(outPath, size)
    await run('mkfs.ext4', ['-q', '-F', '-d', stagingDir, '-L', 'uigniter', '-O', '^has_journal', '-E', 'root_owner=0:0', outPath],
      { onFail: fail('mkfs.ext4') })
  }
}

/**
 * File capabilities (the `security.capability` xattr, e.g. ping's cap_net_raw)
 * of the host files a tree keeps owners for (root's files too), copied onto their staged copies,
 * whose disk keeps xattrs: copyFile drops them, and a chown would clear them,
 * so this runs after both. Node has no xattr API; python3 (a setup package)
 * does it in one process for the whole tree, reading `host\0staged\0` pairs.
 */
async function copyCapabilities (tree: RootfsTree, stagingDir: string): Promise<void> {
  const pairs: string[] = []
  for (const [path, entry] of tree.entries()) {
    if (entry.type === 'file' && 'hostPath' in entry.source) pairs.push(entry.source.hostPath, join(stagingDir, path))
  }
  if (pairs.length === 0) return
  const list = join(stagingDir, '..', 'capability-pairs')
  await writeFile(list, pairs.join('\0') + '\0')
  const script = [
    'import os, sys',
    'items = open(sys.argv[1], "rb").read().split(b"\\0")[:-1]',
    'for host, staged in zip(items[0::2], items[1::2]):',
    '    try:',
    '        value = os.getxattr(host, "security.capability", follow_symlinks=False)',
    '    except OSError:',
    '        continue',
    '    os.setxattr(staged, "security.capability", value, follow_symlinks=False)'
  ].join('\n')
  await run('python3', ['-c', script, list])
}

