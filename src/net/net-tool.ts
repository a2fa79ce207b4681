import { UigniterError } from '../core/errors.js'
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
