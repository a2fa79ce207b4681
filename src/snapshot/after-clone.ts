import { request } from 'node:http'
import { constants } from 'node:os'
import { UigniterError } from '../core/errors.js'
import type { AfterClone } from '../core/image.js'
import type { ControlChannel } from '../vmm/qemu/control-channel.js'
import type { LaunchNetwork } from '../core/ports/vmm-driver.js'

/** How long a clone's app has to answer its hook, unless the hook says otherwise. */
export const DEFAULT_AFTER_CLONE_TIMEOUT_MS = 5000

/** A hook with its defaults filled in, as a template records it. */
export type ResolvedAfterClone =
  | { kind: 'signal', signal: NonNullable<Extract<AfterClone, { kind: 'signal' }>['signal']>, timeoutMs: number }
  | { kind: 'http', path: string, port: number, timeoutMs: number }

/** Where the host reaches a clone's app for an HTTP hook. */
export interface HookAddress { host: string, port: number }

/**
 * Fills in a hook's defaults: SIGUSR2, the template's probe port, DEFAULT_AFTER_CLONE_TIMEOUT_MS.
 * Throws UIG_ERR_TEMPLATE_INVALID for an HTTP hook with no port to go to.
 */
export function resolveAfterClone (hook: AfterClone, defaultPort: number | undefined): ResolvedAfterClone {
  const timeoutMs = hook.timeoutMs ?? DEFAULT_AFTER_CLONE_TIMEOUT_MS
  if (hook.kind === 'signal') return { kind: 'signal', signal: hook.signal ?? 'SIGUSR2', timeoutMs }
  const port = hook.port ?? defaultPort
  if (port === undefined) throw new UigniterError('UIG_ERR_TEMPLATE_INVALID', `the after-clone hook POST ${hook.path} names no port, and the template has none to default to`)
  return { kind: 'http', path: hook.path, port, timeoutMs }
}

/** The hook as one line, for messages. */
export function describeAfterClone (hook: ResolvedAfterClone): string {
  return hook.kind === 'signal' ? `${hook.signal} (acknowledged on the ack fd)` : `POST :${hook.port}${hook.path}`
}

/**
 * Where an HTTP hook goes: the clone's own address on a tap, or the host end
 * of the user-mode forward of the hook's port. Throws UIG_ERR_CLONE_REQUEST
 * when the clone has no way in on that port (a user-mode clone without a
 * forward of it), before anything starts.
 */
export function hookAddress (hook: ResolvedAfterClone, network: LaunchNetwork, guestAddress: string): HookAddress | undefined {
  if (hook.kind !== 'http') return undefined
  if (network.mode === 'tap') return { host: guestAddress, port: hook.port }
  const forward = network.mode === 'user' ? network.forwards.find((f) => f.guestPort === hook.port) : undefined
  if (forward === undefined) {
    throw new UigniterError('UIG_ERR_CLONE_REQUEST', `the template's after-clone hook POSTs to guest port ${hook.port}, which this clone's network does not reach; publish that port, or use the bridge network`)
  }
  return { host: forward.hostAddress === '0.0.0.0' ? '127.0.0.1' : forward.hostAddress, port: forward.hostPort }
}

/**
 * The signal hook, over the control channel the identity went through: the
 * init signals the app and answers once the app wrote its ack (or fails at
 * the deadline), so a clone is never handed out before its app rekeyed.
 * Throws UIG_ERR_CLONE_HOOK_FAILED.
 */
export async function signalHook (channel: ControlChannel, hook: Extract<ResolvedAfterClone, { kind: 'signal' }>): Promise<void> {
  const signal = constants.signals[hook.signal]
  try {
    // The init keeps the deadline; ours only covers a guest that stopped answering altogether.
    await channel.request('after-clone', { signal, timeout_ms: hook.timeoutMs }, hook.timeoutMs + 1000)
  } catch (err) {
    throw new UigniterError('UIG_ERR_CLONE_HOOK_FAILED', `the app did not acknowledge its after-clone signal ${hook.signal} within ${hook.timeoutMs} ms: ${(err as Error).message}`, { cause: err })
  }
}

/**
 * The HTTP hook: POST the path on the clone's address; only a 2xx within the
 * deadline passes. Throws UIG_ERR_CLONE_HOOK_FAILED.
 */
export async function httpHook (address: HookAddress, hook: Extract<ResolvedAfterClone, { kind: 'http' }>): Promise<void> {
  const where = `POST http://${address.host}:${address.port}${hook.path}`
  const status = await new Promise<number>((resolve, reject) => {
    const req = request({ host: address.host, port: address.port, method: 'POST', path: hook.path, agent: false, headers: { 'content-length': '0', 'x-uigniter-event': 'after-clone' } }, (res) => {
      res.resume()
      res.on('end', () => resolve(res.statusCode ?? 0))
      res.on('error', reject)
    })
    const timer = setTimeout(() => req.destroy(new Error(`no answer within ${hook.timeoutMs} ms`)), hook.timeoutMs)
    req.on('close', () => clearTimeout(timer))
    req.on('error', reject)
    req.end()
  }).catch((err: unknown) => {
    throw new UigniterError('UIG_ERR_CLONE_HOOK_FAILED', `the after-clone hook ${where} failed: ${(err as Error).message}`, { cause: err })
  })
  if (status < 200 || status > 299) throw new UigniterError('UIG_ERR_CLONE_HOOK_FAILED', `the after-clone hook ${where} answered ${status}, not 2xx`)
}
