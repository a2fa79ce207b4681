import { readdir, rm } from 'node:fs/promises'
import { join } from 'node:path'

/**
 * Removes work dirs (`.build-<pid>-…`, `.out-<pid>-…`) in the kernels dir whose
 * process died (a crash, a kill -9). Every kernel source names its work dirs
 * this way, so that any of them cleans up after the others.
 */
export async function removeStaleWorkDirs (dir: string): Promise<void> {
  let entries: string[] = []
  try { entries = await readdir(dir) } catch { return }
  for (const entry of entries) {
    const pid = Number(/^\.(?:build|out)-(\d+)-/.exec(entry)?.[1])
    if (!Number.isInteger(pid)) continue
    try { process.kill(pid, 0) } catch { await rm(join(dir, entry), { recursive: true, force: true }) }
  }
}
