import { spawn } from 'node:child_process'
import { UigniterError, hasErrno } from '../core/errors.js'
import { run } from '../core/exec.js'

/** What to say when the host refuses: the two ways forward. */
export const NOT_ROOT_ADVICE = 'run the uigniter daemon as root (it needs CAP_NET_ADMIN for bridges, taps and firewall rules), or use network: user'

/**
 * Runs a host networking tool (`ip`, `nft`) and returns its stdout. Its
 * failures become UigniterErrors: "Operation not permitted" is
 * UIG_ERR_HOST_NOT_ROOT, anything else UIG_ERR_NET_SETUP_FAILED with the
 * tool's own message. When stderr matches `tolerate`, the failure is expected
 * (e.g. "File exists" for an idempotent add) and undefined is returned.
 *
 * @example
 * await runNetTool('ip', ['link', 'del', 'dev', 'uig0'], { tolerate: /Cannot find device/ })
 */
export async function runNetTool (tool: 'ip' | 'nft', args: string[], options: { tolerate?: RegExp } = {}): Promise<string | undefined> {
  let tolerated = false
  try {
    const { stdout } = await run(tool, args, {
      onFail: ({ stderr, code }) => {
        const message = stderr.trim() === '' ? `exited with ${code}` : stderr.trim().split('\n').slice(0, 6).join('; ')
        if (options.tolerate?.test(stderr) === true) {
          tolerated = true
          return new Error(message)
        }
        if (/Operation not permitted|Permission denied/.test(stderr)) {
          return new UigniterError('UIG_ERR_HOST_NOT_ROOT', `"${tool} ${args.join(' ')}" was refused (${message}); ${NOT_ROOT_ADVICE}`)
        }
        return new UigniterError('UIG_ERR_NET_SETUP_FAILED', `"${tool} ${args.join(' ')}" failed: ${message}`)
      }
    })
    return stdout
  } catch (err) {
    if (tolerated) return undefined
    throw err
  }
}

/** Where an `ip -batch` stopped: the command that failed (0-based) and what `ip` said. */
export interface IpBatchFailure { index: number, command: string, message: string }

/**
 * Runs `ip` commands in one process (`ip -batch -`), in order, stopping at
 * the first that fails, which it returns (undefined when all ran): one
 * process per attach instead of one per command, which mattered because a
 * spawn costs the daemon's main thread more the larger the daemon grows.
 * "Operation not permitted" is UIG_ERR_HOST_NOT_ROOT whichever command it
 * was. Commands are single lines of validated names and addresses.
 *
 * @example
 * await runIpBatch(['tuntap add dev uig0 mode tap', 'link set dev uig0 master br0 up']) // undefined: both ran
 */
export async function runIpBatch (commands: string[]): Promise<IpBatchFailure | undefined> {
  return (await ipBatch(commands, false))[0]
}

/**
 * runIpBatch that goes on past failures (`ip -force -batch -`) and returns
 * every one, in order: for commands that do not depend on each other, such
 * as the deletions of many taps.
 */
export async function runIpBatchAll (commands: string[]): Promise<IpBatchFailure[]> {
  return await ipBatch(commands, true)
}

async function ipBatch (commands: string[], force: boolean): Promise<IpBatchFailure[]> {
  if (commands.length === 0) return []
  for (const c of commands) if (/[\n\r]/.test(c)) throw new TypeError(`an ip batch command must be one line: ${JSON.stringify(c)}`)
  const { code, stderr } = await new Promise<{ code: number | null, stderr: string }>((resolve, reject) => {
    const child = spawn('ip', [...(force ? ['-force'] : []), '-batch', '-'], { stdio: ['pipe', 'ignore', 'pipe'] })
    let err = ''
    child.stderr.on('data', (c: Buffer) => { err += c.toString() })
    child.on('error', (e) => {
      reject(hasErrno(e, 'ENOENT') ? new UigniterError('UIG_ERR_HOST_MISSING_TOOL', '"ip" is not installed; run "npm run setup" (as root) to install uigniter\'s host packages', { cause: e }) : e)
    })
    child.on('close', (c) => resolve({ code: c, stderr: err }))
    // EPIPE when ip stopped early at a failure: its stderr says which.
    child.stdin.on('error', () => {})
    child.stdin.end(commands.join('\n') + '\n')
  })
  if (code === 0) return []
  // Each failure is what ip said, then "Command failed -:N", N counting lines from 1.
  const failures: IpBatchFailure[] = []
  let said: string[] = []
  for (const line of stderr.split('\n')) {
    const m = /^Command failed -:(\d+)/.exec(line)
    if (m?.[1] === undefined) {
      if (line.trim() !== '') said.push(line.trim())
      continue
    }
    const index = Number(m[1]) - 1
    failures.push({ index, command: commands[index] ?? '?', message: said.slice(0, 6).join('; ') || `exited with ${code}` })
    said = []
  }
  if (failures.length === 0) failures.push({ index: commands.length - 1, command: commands.join('; '), message: said.slice(0, 6).join('; ') || `exited with ${code}` })
  const refused = failures.find((f) => /Operation not permitted|Permission denied/.test(f.message))
  if (refused !== undefined) throw new UigniterError('UIG_ERR_HOST_NOT_ROOT', `"ip ${refused.command}" was refused (${refused.message}); ${NOT_ROOT_ADVICE}`)
  return failures
}

/** Runs `ip -j ...` and parses its JSON; `[]` when `ip` prints nothing (e.g. no matching links). */
export async function ipJson<T> (args: string[], options: { tolerate?: RegExp } = {}): Promise<T[] | undefined> {
  const stdout = await runNetTool('ip', ['-j', ...args], options)
  if (stdout === undefined) return undefined
  return stdout.trim() === '' ? [] : JSON.parse(stdout) as T[]
}

/** The fields of `ip -j -d link` and `ip -j addr` that uigniter reads. */
export interface IpLink {
  ifindex?: number
  ifname: string
  address?: string
  flags?: string[]
  operstate?: string
  master?: string
  linkinfo?: { info_kind?: string, info_data?: { type?: string } }
  addr_info?: Array<{ family: string, local: string, prefixlen: number }>
}
