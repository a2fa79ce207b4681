import assert from 'node:assert/strict'
import { appendFileSync } from 'node:fs'
import { readFile, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { test } from 'node:test'
import { ConsoleLog } from '../../src/vmm/qemu/console-log.js'
import { tempDir } from '../helpers/assertions.js'

const line = (i: number): string => `line ${String(i).padStart(5, '0')} ${'.'.repeat(40)}\n`

test('rotation keeps the newest output within the bound, and a follower sees every byte once across rotations', async (t) => {
  const path = join(await tempDir(t), 'console.log')
  await writeFile(path, '')
  const log = new ConsoleLog(path, { limitBytes: 1000, pollMs: 20 })
  t.after(() => log.close())
  let followed = ''
  const stop = log.follow((text) => { followed += text }, { tailBytes: Infinity })

  let written = ''
  for (let i = 0; i < 200; i++) {
    // O_APPEND, as QEMU's logappend=on: writes land at the end even after a truncate.
    appendFileSync(path, line(i))
    written += line(i)
    if (i % 7 === 0) await log.poll()
    if (i % 13 === 0) await log.rotateIfNeeded()
  }
  await log.rotateIfNeeded()
  await log.poll()
  stop()
  assert.equal(followed, written)
  assert.ok((await stat(path)).size <= 1000)
  assert.ok((await stat(`${path}.1`)).size <= 1000)
  const tail = await log.read({ tailBytes: 3 * line(0).length })
  assert.equal(tail, line(197) + line(198) + line(199))
  assert.ok(written.endsWith(await readFile(path, 'utf8')))
})

test('follow from the end sees only new output; multi-byte characters split across writes arrive whole', async (t) => {
  const path = join(await tempDir(t), 'console.log')
  await writeFile(path, 'old output\n')
  const log = new ConsoleLog(path, { pollMs: 20 })
  t.after(() => log.close())
  const chunks: string[] = []
  const stop = log.follow((text) => chunks.push(text))
  await log.poll()
  const euro = Buffer.from('€\n')
  appendFileSync(path, euro.subarray(0, 1))
  await log.poll()
  appendFileSync(path, euro.subarray(1))
  await log.poll()
  stop()
  assert.equal(chunks.join(''), '€\n')
})
