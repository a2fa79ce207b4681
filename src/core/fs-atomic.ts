import { randomBytes } from 'node:crypto'
import { mkdir, rename, rm, writeFile } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { rethrowNoSpace } from './errors.js'

/** A sibling temporary name: same directory, so rename() is atomic. */
export function tempSibling (path: string): string {
  return join(dirname(path), `.tmp-${randomBytes(6).toString('hex')}-${path.split('/').pop() ?? 'x'}`)
}

/** Writes a file atomically: a temp name in the same directory, then rename. */
export async function writeFileAtomic (path: string, data: string | Buffer): Promise<void> {
  await mkdir(dirname(path), { recursive: true })
  const tmp = tempSibling(path)
  try {
    await writeFile(tmp, data)
    await rename(tmp, path)
  } catch (err) {
    await rm(tmp, { force: true })
    rethrowNoSpace(err, path)
  }
}
