import { createHash } from 'node:crypto'
import { UigniterError } from '../core/errors.js'
import { ipJson, runIpBatch, runIpBatchAll, type IpLink } from './net-tool.js'

/** Every tap uigniter creates starts with this, so that orphans can be found by name. */
export const DEFAULT_TAP_PREFIX = 'uig'

/** Linux limits interface names to 15 bytes; at least 8 hex digits keep names apart. */
const MAX_NAME = 15
const MIN_HASH = 8

const NO_DEVICE = /does not exist|Cannot find device/

/**
 * The tap name of a VM: the prefix and as many hex digits of a hash of the id
 * as fit in 15 bytes (`uig` + 12 by default). Hashing makes any id fit, and
 * the same id always gives the same name, so a restarted daemon finds its
 * taps again.
 *
 * @example
 * tapNameFor('0f6c1a2e-...') // 'uig' followed by 12 hex digits
 */
export function tapNameFor (vmId: string, prefix = DEFAULT_TAP_PREFIX): string {
  assertPrefix(prefix)
  const hash = createHash('sha256').update(vmId).digest('hex')
  return prefix + hash.slice(0, MAX_NAME - prefix.length)
}

/** What the host should know of the guest behind a tap before it sends anything: its address and MAC. */
export interface TapNeighbour { ip: string, mac: string }

const MAC = /^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$/i
const IPV4 = /^\d{1,3}(?:\.\d{1,3}){3}$/

/**
 * Creates tap `name` plugged into `bridge` and up, ready for QEMU to open
 * (`-netdev tap,ifname=NAME,script=no,downscript=no`). The tap is persistent:
 * it outlives QEMU, and deleteTap() removes it. Idempotent: an existing tap
 * is re-plugged and brought up. With `neighbour`, the bridge's neighbour
 * entry for the guest's address is set to its MAC (stale, so the kernel
 * confirms it on first use): an address that belonged to another MAC moments
 * ago reaches the new guest at once, and the host never has to ask the whole
 * bridge (every VM on it) who has it.
 * One `ip` process; a second (and a third) only when the device existed.
 */
export async function createTap (name: string, bridge: string, neighbour?: TapNeighbour): Promise<void> {
  for (const dev of [name, bridge]) {
    if (dev.length > MAX_NAME || !/^[A-Za-z0-9_.-]+$/.test(dev)) throw new TypeError(`"${dev}" is not a valid interface name`)
  }
  if (neighbour !== undefined && (!MAC.test(neighbour.mac) || !IPV4.test(neighbour.ip))) throw new TypeError(`invalid neighbour ${neighbour.ip} at ${neighbour.mac}`)
  const plug = [
    `link set dev ${name} master ${bridge} up`,
    ...(neighbour !== undefined ? [`neigh replace ${neighbour.ip} lladdr ${neighbour.mac} dev ${bridge} nud stale`] : [])
  ]
  const failed = await runIpBatch([`tuntap add dev ${name} mode tap`, ...plug])
  if (failed === undefined) return
  if (failed.index > 0) throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `"ip ${failed.command}" failed: ${failed.message}`)
  if (!/File exists|Device or resource busy/.test(failed.message)) throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `"ip ${failed.command}" failed: ${failed.message}`)
  // The name is taken: by our tap (a re-adopted VM; it may have fallen off the bridge), or by something else.
  const link = (await ipJson<IpLink>(['-d', 'link', 'show', 'dev', name], { tolerate: NO_DEVICE }))?.[0]
  if (link !== undefined && (link.linkinfo?.info_kind !== 'tun' || link.linkinfo.info_data?.type !== 'tap')) {
    throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `a device named ${name} exists and is not a tap; delete it (ip link del ${name})`)
  }
  const again = await runIpBatch(link === undefined ? [`tuntap add dev ${name} mode tap`, ...plug] : plug)
  if (again !== undefined) throw new UigniterError('UIG_ERR_NET_SETUP_FAILED', `"ip ${again.command}" failed: ${again.message}`)
}

/** Deletions asked for while the last batch ran, each with its outcome. */
let queuedDeletes: Map<string, Array<(err?: Error) => void>> | undefined
let deleting: Promise<void> = Promise.resolve()

/**
 * Deletes tap `name`; no-op when it does not exist. Deletions asked for
 * while an earlier one runs go together, in one `ip` process, when it is
 * done: VMs that end together cost one process, not one each.
 */
export async function deleteTap (name: string): Promise<void> {
  if (name.length > MAX_NAME || !/^[A-Za-z0-9_.-]+$/.test(name)) throw new TypeError(`"${name}" is not a valid interface name`)
  await new Promise<void>((resolve, reject) => {
    const done = (err?: Error): void => { if (err === undefined) resolve(); else reject(err) }
    if (queuedDeletes !== undefined) {
      queuedDeletes.set(name, [...(queuedDeletes.get(name) ?? []), done])
      return
    }
    const batch = new Map([[name, [done]]])
    queuedDeletes = batch
    deleting = deleting.then(async () => {
      queuedDeletes = undefined
      const names = [...batch.keys()]
      let failures: Awaited<ReturnType<typeof runIpBatchAll>> = []
      try {
        failures = await runIpBatchAll(names.map((n) => `link del dev ${n}`))
      } catch (err) {
        for (const waiters of batch.values()) for (const w of waiters) w(err as Error)
        return
      }
      names.forEach((n, i) => {
        const failed = failures.find((f) => f.index === i)
        const err = failed === undefined || NO_DEVICE.test(failed.message) ? undefined : new UigniterError('UIG_ERR_NET_SETUP_FAILED', `"ip ${failed.command}" failed: ${failed.message}`)
        for (const w of batch.get(n) ?? []) w(err)
      })
    })
  })
}

/**
 * The names of every tap that tapNameFor() could have made with `prefix` (the
 * prefix, then hex digits up to 15 bytes): after a crash, the candidates for
 * cleanup. Taps of other tools, or of another prefix that merely starts the
 * same (`uigt...` for `uig`), do not match.
 */
export async function listTaps (prefix = DEFAULT_TAP_PREFIX): Promise<string[]> {
  assertPrefix(prefix)
  const ours = new RegExp(`^${prefix}[0-9a-f]{${MAX_NAME - prefix.length}}$`)
  const links = await ipJson<IpLink>(['-d', 'link', 'show', 'type', 'tun']) ?? []
  return links
    .filter((l) => ours.test(l.ifname) && l.linkinfo?.info_data?.type === 'tap')
    .map((l) => l.ifname)
    .sort()
}

function assertPrefix (prefix: string): void {
  if (prefix === '' || prefix.length > MAX_NAME - MIN_HASH || !/^[A-Za-z0-9_-]+$/.test(prefix)) {
    throw new TypeError(`tap prefix "${prefix}" must be 1 to ${MAX_NAME - MIN_HASH} letters, digits, "_" or "-"`)
  }
}
