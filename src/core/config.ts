import { readFileSync } from 'node:fs'
import { homedir } from 'node:os'
import { join } from 'node:path'
import { Type, type Static } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import { UigniterError, hasErrno } from './errors.js'

/**
 * uigniter's configuration: a JSON file (default /etc/uigniter/config.json,
 * or the path in UIGNITER_CONFIG), validated once against this schema and then
 * frozen. Environment variables override single fields for scripts and tests.
 */
export const ConfigSchema = Type.Object({
  dataDir: Type.String({ minLength: 1, description: 'Images, VM state and the database. Env: UIGNITER_DATA_DIR' }),
  cacheDir: Type.String({ minLength: 1, description: 'Built guest kernels and probe results, shared by every data dir. Env: UIGNITER_CACHE_DIR' }),
  kernel: Type.Object({
    source: Type.Union([Type.Literal('build'), Type.Literal('debian-cloud')], {
      description: '"build": our own tiny kernel from linux-source-6.1; "debian-cloud": Debian\'s packaged cloud kernel, virtio modules loaded from the initramfs'
    })
  }, { additionalProperties: false }),
  accel: Type.Union([Type.Literal('auto'), Type.Literal('kvm'), Type.Literal('tcg')], {
    description: '"auto" probes KVM with a tiny guest and falls back to TCG. Env: UIGNITER_ACCEL'
  })
}, { additionalProperties: false })

export type Config = Readonly<Static<typeof ConfigSchema>>

const PartialConfigSchema = Type.Partial(ConfigSchema, { additionalProperties: false })

function defaults (): Static<typeof ConfigSchema> {
  const root = process.getuid?.() === 0
  return {
    dataDir: root ? '/var/lib/uigniter' : join(homedir(), '.local/share/uigniter'),
    cacheDir: root ? '/var/cache/uigniter' : join(homedir(), '.cache/uigniter'),
    kernel: { source: 'build' },
    accel: 'auto'
  }
}

/** Formats TypeBox validation errors as `path: message` lines a person can act on. */
export function describeSchemaErrors (schema: Parameters<typeof Value.Errors>[0], value: unknown): string {
  return [...Value.Errors(schema, value)].slice(0, 5)
    .map((e) => `${e.path === '' ? '(root)' : e.path}: ${e.message}`).join('; ')
}

/**
 * Loads the configuration: defaults, then the config file if present, then
 * environment overrides. Throws UIG_ERR_CONFIG_INVALID naming the bad field.
 */
export function loadConfig (env: NodeJS.ProcessEnv = process.env): Config {
  const file = env.UIGNITER_CONFIG ?? '/etc/uigniter/config.json'
  let fromFile: unknown = {}
  try {
    fromFile = JSON.parse(readFileSync(file, 'utf8'))
  } catch (err) {
    if (!(hasErrno(err, 'ENOENT') && env.UIGNITER_CONFIG === undefined)) {
      throw new UigniterError('UIG_ERR_CONFIG_INVALID', `cannot read config file ${file}: ${(err as Error).message}`, { cause: err })
    }
  }
  if (!Value.Check(PartialConfigSchema, fromFile)) {
    throw new UigniterError('UIG_ERR_CONFIG_INVALID', `config file ${file} is invalid: ${describeSchemaErrors(PartialConfigSchema, fromFile)}`)
  }
  const merged: Record<string, unknown> = { ...defaults(), ...fromFile }
  if (env.UIGNITER_DATA_DIR !== undefined) merged.dataDir = env.UIGNITER_DATA_DIR
  if (env.UIGNITER_CACHE_DIR !== undefined) merged.cacheDir = env.UIGNITER_CACHE_DIR
  if (env.UIGNITER_ACCEL !== undefined) merged.accel = env.UIGNITER_ACCEL
  if (env.UIGNITER_KERNEL_SOURCE !== undefined) merged.kernel = { source: env.UIGNITER_KERNEL_SOURCE }
  if (!Value.Check(ConfigSchema, merged)) {
    throw new UigniterError('UIG_ERR_CONFIG_INVALID', `configuration is invalid: ${describeSchemaErrors(ConfigSchema, merged)}`)
  }
  return Object.freeze(merged)
}
