import { createHash } from 'node:crypto'
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { Template } from '../../src/snapshot/template.js'

/**
 * What it takes to use a template copied from another node: its files moved
 * (bench/lib/template-file-server.ts serves them) and its record rewritten,
 * because template.json names absolute paths of the node that made it.
 */

/**
 * Where a data dir that is not on tmpfs keeps template `id`'s RAM: the same
 * rule as Template.create's default (src/snapshot/template.ts), so that the
 * daemon's own delete (Template.remove) finds the copied file too.
 */
export function templateMemoryDir (dataDir: string, id: string): string {
  const dir = Template.dirOf(dataDir, id)
  return join('/dev/shm/uigniter-templates', `${createHash('sha256').update(dir).digest('hex').slice(0, 12)}-${id}`)
}

/**
 * Writes template.json for a copy of template `id` from `fromDataDir` into
 * `toDataDir`, once its RAM file is at templateMemoryDir(toDataDir, id) and
 * its state file in the template's directory there. The record's paths of
 * the source node (its image store, its template directory) become the
 * target's: the target holds the same image by digest under the same layout.
 * The kernel path stays: the nodes share one kernel cache here, and the
 * saved device state is only valid with the very kernel, QEMU and machine
 * arguments it was taken with.
 */
export async function installCopiedTemplate (options: { fromDataDir: string, toDataDir: string, id: string }): Promise<void> {
  const { fromDataDir, toDataDir, id } = options
  const from = resolve(fromDataDir)
  const to = resolve(toDataDir)
  const text = await readFile(join(Template.dirOf(from, id), 'template.json'), 'utf8')
  const record = JSON.parse(text.split(`${from}/`).join(`${to}/`)) as { memoryPath: string, statePath: string }
  record.memoryPath = join(templateMemoryDir(to, id), 'memory.ram')
  record.statePath = join(Template.dirOf(to, id), 'state.bin')
  const dir = Template.dirOf(to, id)
  await mkdir(dir, { recursive: true, mode: 0o700 })
  // Written last and renamed into place: the daemon takes a directory with template.json as a complete template.
  await writeFile(join(dir, 'template.json.tmp'), JSON.stringify(record, null, 2) + '\n')
  await rename(join(dir, 'template.json.tmp'), join(dir, 'template.json'))
}
