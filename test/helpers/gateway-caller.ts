import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { run } from '../../src/core/exec.js'
import { packageRoot } from './fixtures.js'

/**
 * Compiles the gateway caller (test/helpers/guests/gateway-caller.c: asks a
 * service through its own node's gateway and answers with what it got) into
 * `dir`, statically, and returns the binary's path for an `elf` image.
 */
export async function buildGatewayCaller (dir: string): Promise<string> {
  await mkdir(dir, { recursive: true })
  const out = join(dir, 'gateway-caller')
  await run('gcc', ['-static', '-O2', '-Wall', '-Wextra', '-Werror', '-o', out, join(packageRoot, 'test/helpers/guests/gateway-caller.c')])
  return out
}
