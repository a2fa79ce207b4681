import { randomBytes } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
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

/**
 * Gives the guest its identity over the control channel: address, MAC,
 * hostname, a fresh RNG seed from the host and the host's clock, and the
 * app's environment when the app waits for it. The init checks everything
 * before changing anything, and answers once every step took.
 * Throws UIG_ERR_CLONE_IDENTITY when it did not within `timeoutMs`.
 * `then` runs on the same channel once the identity took (the after-clone
 * signal hook), its errors thrown as they are.
 */
export async function sendIdentity (controlSocket: string, identity: GuestIdentity, timeoutMs: number, then?: (channel: ControlChannel) => Promise<void>): Promise<void> {
  checkIdentityEnv(identity.env ?? {})
  const envArgs = Object.entries(identity.env ?? {}).map(([key, value]) => `env=${key}=${encodeParam(value)}`)
  const deadline = Date.now() + timeoutMs
  let channel: ControlChannel | undefined
  try {
    channel = await ControlChannel.connect(controlSocket, timeoutMs)
    const { address, prefix, gateway } = identity.guestNetwork
    await channel.request(['identity', ...envArgs].join(' '), {
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
}

/**
 * Waits until the init holds the app back for an identity: it answers
 * `status` with `"app":"waiting"`, which also proves it serves the control
 * channel. The channel is closed again, so that the next host connection
 * (a clone's, or a claim's) is news to the guest.
 */
export async function waitForIdentityWait (controlSocket: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  const channel = await ControlChannel.connect(controlSocket, timeoutMs)
  try {
    for (;;) {
      const reply = await channel.request('status', {}, Math.max(1, deadline - Date.now()))
      if (reply.app === 'waiting') return
      if (reply.app !== 'running' || Date.now() > deadline) {
        throw new UigniterError('UIG_ERR_TEMPLATE_FAILED', `the guest init does not wait for an identity (its app is ${String(reply.app)}): the image's init is older than uigniter.wait support; rebuild the image`)
      }
      await sleep(20)
    }
  } finally {
    channel.close()
  }
}

