import { spawn } from 'node:child_process'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { loadConfig, type Config } from '../../src/core/config.js'
import { packageRoot } from '../../src/core/package-paths.js'
import { ImageBuilder } from '../../src/guest/image-builder.js'
import { createKernelSource } from '../../src/guest/guest-kernel.js'
import { ImageStore } from '../../src/guest/image-store.js'

export { packageRoot }

export interface TestContext {
  dataDir: string
  config: Config
  store: ImageStore
  builder: ImageBuilder
  env: NodeJS.ProcessEnv
}

/**
 * A fresh data directory per test file, with the machine's shared kernel
 * cache (the kernel is built once by setup, never per test). `envOverrides`
 * change the configuration, e.g. `UIGNITER_KERNEL_SOURCE`.
 */
export async function createTestContext (envOverrides: NodeJS.ProcessEnv = {}): Promise<TestContext & { cleanup: () => Promise<void> }> {
  const dataDir = await mkdtemp(join(tmpdir(), 'uigniter-test-'))
  const env = { ...process.env, ...envOverrides, UIGNITER_DATA_DIR: dataDir }
  const config = loadConfig(env)
  const store = new ImageStore(dataDir)
  const builder = new ImageBuilder(store, createKernelSource(config))
  return { dataDir, config, store, builder, env, cleanup: async () => { await rm(dataDir, { recursive: true, force: true }) } }
}

export const exampleSpec = (name: string): string => join(packageRoot, 'examples', name, 'image.json')

/** Runs the CLI as a child process and collects its output. */
export async function runCli (args: string[], options: { env?: NodeJS.ProcessEnv, uid?: number, gid?: number } = {}): Promise<{ code: number | null, stdout: string, stderr: string }> {
  return await new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(packageRoot, 'dist/src/daemon/main.js'), ...args], {
      env: options.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'], cwd: packageRoot,
      ...(options.uid !== undefined ? { uid: options.uid, gid: options.gid ?? options.uid } : {})
    })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (c: Buffer) => { stdout += c.toString() })
    child.stderr.on('data', (c: Buffer) => { stderr += c.toString() })
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}
