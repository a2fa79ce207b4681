import { randomBytes } from 'node:crypto'
import { UigniterError } from '../core/errors.js'
import { encodeParam } from '../vmm/qemu/command-line.js'
import { ControlChannel } from '../vmm/qemu/control-channel.js'
import type { GuestNetwork } from '../core/ports/vmm-driver.js'

/** Who a guest is on the network: given to a clone, or to a booted pool instance when it is claimed. */
export interface GuestIdentity {
  guestNetwork: GuestNetwork
  mac: string
  hostname: string
  /** Added to the image's environment; only for an app not started yet. */
  env?: Record<string, string>
}

/** ip, gw, mac, hostname, seed, time: the init takes 16 arguments per command. */
const MAX_IDENTITY_ENV = 10

/** Throws UIG_ERR_CLONE_REQUEST for an environment the init cannot take. */
export function checkIdentityEnv (env: Record<string, string>): void {
  const names = Object.keys(env)
  const bad = names.find((key) => !/^[A-Za-z_][A-Za-z0-9_]*$/.test(key))
  if (bad !== undefined) throw new UigniterError('UIG_ERR_CLONE_REQUEST', `invalid environment variable name "${bad}"`)
  if (names.length > MAX_IDENTITY_ENV) throw new UigniterError('UIG_ERR_CLONE_REQUEST', `a clone takes at most ${MAX_IDENTITY_ENV} environment variables, not ${names.length}`)
}

/** What the guest said of the identity step. */
export interface IdentityTaken {
  /** The init's own time for the step (checks, RNG, clock, hostname, network), in ms; undefined from an init before version 3. */
  guestMs: number | undefined
}

/** The first init that announces its wait for an identity and times the step (src/guest/init/uigniter-init.c). */
export const ANNOUNCING_INIT_VERSION = 3

/** Larger is not a time the init measured: an hour, in µs. */
const MAX_TOOK_US = 3_600_000_000

/**
 * Gives the guest its identity over the control channel: address, MAC,
 * hostname, a fresh RNG seed from the host and the host's clock, and the
 * app's environment when the app waits for it. The init checks everything
 * before changing anything, and answers once every step took.
 * Throws UIG_ERR_CLONE_IDENTITY when it did not within `timeoutMs`.
 * `then` runs on the same channel once the identity took (the after-clone
 * signal hook), its errors thrown as they are.
 */
export async function sendIdentity (controlSocket: string, identity: GuestIdentity, timeoutMs: number, then?: (channel: ControlChannel) => Promise<void>): Promise<IdentityTaken> {
  checkIdentityEnv(identity.env ?? {})
  const envArgs = Object.entries(identity.env ?? {}).map(([key, value]) => `env=${key}=${encodeParam(value)}`)
  const deadline = Date.now() + timeoutMs
  let channel: ControlChannel | undefined
  let reply: Record<string, unknown>
  try {
    channel = await ControlChannel.connect(controlSocket, timeoutMs)
    const { address, prefix, gateway } = identity.guestNetwork
    reply = await channel.request(['identity', ...envArgs].join(' '), {
      ip: `${address}/${prefix}`,
      ...(gateway !== undefined ? { gw: gateway } : {}),
      mac: identity.mac,
      hostname: identity.hostname,
      seed: randomBytes(32).toString('hex'),
      time: Date.now()
    }, Math.max(1, deadline - Date.now()))
  } catch (err) {
    channel?.close()
    throw new UigniterError('UIG_ERR_CLONE_IDENTITY', `the guest did not take its identity within ${timeoutMs} ms: ${(err as Error).message}`, { cause: err })
  }
  try {
    if (then !== undefined) await then(channel)
  } finally {
    channel.close()
  }
  // The guest's word, so only a plausible number counts.
  const tookUs = reply.took_us
  return { guestMs: typeof tookUs === 'number' && Number.isInteger(tookUs) && tookUs >= 0 && tookUs < MAX_TOOK_US ? tookUs / 1000 : undefined }
}

/**
 * Waits until the init holds the app back for an identity: the init
 * announces it to every host connection (`{"event":"waiting"}`), which also
 * proves it serves the control channel; nothing is polled. The channel is
 * closed again, so that the next host connection (a clone's, or a claim's)
 * is news to the guest. `initVersion` (the image's, from its manifest): an
 * init older than ANNOUNCING_INIT_VERSION announces nothing, and is asked
 * once instead.
 */
/** How long the host waits for the init's announcement before it also asks. */
const ANNOUNCEMENT_GRACE_MS = 1000

export async function waitForIdentityWait (controlSocket: string, timeoutMs: number, initVersion = ANNOUNCING_INIT_VERSION): Promise<void> {
  const deadline = Date.now() + timeoutMs
  const channel = await ControlChannel.connect(controlSocket, timeoutMs)
  try {
    if (initVersion >= ANNOUNCING_INIT_VERSION) {
      // Never rejects: the error, if the announcement does not come, is the value.
      const announced = channel.waitForEvent((e) => e.event === 'waiting' && e.for === 'identity', Math.max(1, deadline - Date.now()), 'its wait for an identity')
        .then(() => undefined, (err: unknown) => err as Error)
      // The init announces to each host connection it sees open; a busy guest can miss a quick
      // close and reopen (a second host right after the first) and stay silent. One question, if
      // the announcement is slow, tells the same.
      const asked = new Promise<undefined>((resolve) => {
        const timer = setTimeout(() => {
          channel.request('status', {}, Math.max(1, deadline - Date.now())).then((reply) => { if (reply.app === 'waiting') resolve(undefined) }, () => {})
        }, ANNOUNCEMENT_GRACE_MS)
        void announced.then(() => { clearTimeout(timer) })
      })
      const failed = await Promise.race([announced, asked])
      if (failed !== undefined) {
        throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', channel.closed
          ? `the control channel closed before the guest init announced its wait for an identity (the VM stopped?): ${failed.message}`
          : `the guest init did not announce its wait for an identity within ${timeoutMs} ms; an image whose init is older than version ${ANNOUNCING_INIT_VERSION} never does: rebuild the image`, { cause: failed })
      }
      return
    }
    // The old init answers only from its event loop, which it enters already waiting: one question suffices.
    const reply = await channel.request('status', {}, Math.max(1, deadline - Date.now()))
    if (reply.app !== 'waiting') {
      throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', `the guest init does not wait for an identity (its app is ${String(reply.app).slice(0, 40)}): the image's init is older than uigniter.wait support; rebuild the image`)
    }
  } finally {
    channel.close()
  }
}
