// What api and worker both read from their env: the kv service (memcached,
// through the gateway's TCP port for it) and how long tasks are kept.

import { KvClient } from './kv-client.js'

/** A whole number from the env, or the fallback; anything else stops the app with the variable's name. */
export function intEnv (name, fallback) {
  const text = process.env[name]
  const v = Number(text ?? fallback)
  if (!Number.isInteger(v) || v < 0) throw new Error(`${name} must be a whole number, not ${JSON.stringify(text)}`)
  return v
}

/** The kv client: KV_HOST (default: the gateway's address) and KV_PORT (the kv service's gatewayPort). */
export function kvFromEnv () {
  return new KvClient({
    host: process.env.KV_HOST ?? process.env.UIGNITER_GATEWAY_HOST ?? '127.0.0.1',
    port: intEnv('KV_PORT', 11311),
    timeoutMs: intEnv('KV_TIMEOUT_MS', 3000)
  })
}

/** Seconds a task stays in kv. */
export const TASK_TTL_S = intEnv('TASK_TTL_S', 86_400)
