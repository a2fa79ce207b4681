import { spawn, type SpawnOptions } from 'node:child_process'
import { UigniterError, hasErrno } from './errors.js'

export interface RunResult { stdout: string; stderr: string }

/**
 * Runs a host program to completion, capturing its output; rejects with
 * UIG_ERR_HOST_MISSING_TOOL when it is not installed, or `onFail(result)`'s
 * error when it exits non-zero. `onLine` sees stdout and stderr line by line
 * (for progress); then only the last `keepTail` characters of each are kept
 * (200 000 by default), for the error message of a long build. Without
 * `onLine` all of it is kept: callers parse it (`ip -j` on a host with
 * hundreds of taps is megabytes of JSON).
 */
export async function run (cmd: string, args: string[], options: SpawnOptions & {
  onLine?: (line: string) => void
  onFail?: (result: RunResult & { code: number | null }) => Error
  keepTail?: number
} = {}): Promise<RunResult> {
  const { onLine, onFail, keepTail = onLine !== undefined ? 200_000 : Infinity, ...spawnOptions } = options
  return await new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { ...spawnOptions, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    let partial = ''
    const take = (chunk: Buffer, which: 'out' | 'err'): void => {
      const text = chunk.toString()
      if (which === 'out') stdout = (stdout + text).slice(-keepTail)
      else stderr = (stderr + text).slice(-keepTail)
      if (onLine === undefined) return
      const lines = (partial + text).split('\n')
      partial = lines.pop() ?? ''
      for (const line of lines) onLine(line)
    }
    child.stdout?.on('data', (c: Buffer) => take(c, 'out'))
    child.stderr?.on('data', (c: Buffer) => take(c, 'err'))
    child.on('error', (err) => {
      if (hasErrno(err, 'ENOENT')) {
        reject(new UigniterError('UIG_ERR_HOST_MISSING_TOOL', `"${cmd}" is not installed; run "npm run setup" (as root) to install uigniter's host packages`, { cause: err }))
      } else reject(err)
    })
    child.on('close', (code) => {
      if (code === 0) resolve({ stdout, stderr })
      else if (onFail !== undefined) reject(onFail({ stdout, stderr, code }))
      else reject(new Error(`${cmd} ${args.join(' ')} exited with ${code}: ${stderr.trim().split('\n').slice(-5).join('\n')}`))
    })
  })
}
