import { posix } from 'node:path'
import { Value } from '@sinclair/typebox/value'
import { parse as parseYaml, YAMLParseError } from 'yaml'
import { describeSchemaErrors } from '../core/config.js'
import { UigniterError } from '../core/errors.js'
import { SERVICE_NAME, ServiceSpecSchema, type AppFile, type ServiceSpec } from '../core/service.js'

/**
 * Validates one service spec: the schema (with its defaults filled in), then
 * the rules a schema cannot say. Returns the spec with `replicas.max` made
 * explicit. `where` prefixes the messages (`services[2]`) in an app file.
 *
 * @example
 * const spec = parseServiceSpec({ name: 'web', image: 'hello', ports: [{ port: 8080 }] })
 * spec.replicas // { min: 1, max: 1 }
 */
export function parseServiceSpec (input: unknown, where = ''): ServiceSpec {
  const spec = Value.Default(ServiceSpecSchema, structuredClone(input))
  if (!Value.Check(ServiceSpecSchema, spec)) {
    throw invalid(where, describeSchemaErrors(ServiceSpecSchema, spec))
  }
  // A service without an image runs no replicas: its replicas.min defaults to 0, not 1.
  if (spec.image === undefined && !hasField(input, 'replicas', 'min')) spec.replicas.min = 0
  const at = (field: string): string => `${where === '' ? '' : `${where}.`}${field}`
  spec.replicas.max ??= Math.max(spec.replicas.min, 1)
  // A checked spec (max 0 without an image) must pass again: the CLI checks a file, then the API checks what it sent.
  if (spec.image !== undefined && spec.replicas.max < 1) throw invalid(where, `${at('replicas.max')} must be at least 1 for a service with an image (it runs replicas of it)`)
  if (spec.replicas.max < spec.replicas.min) throw invalid(where, `${at('replicas.max')} (${spec.replicas.max}) is below replicas.min (${spec.replicas.min})`)
  if (spec.image === undefined && spec.endpoints.length === 0) {
    throw invalid(where, `service "${spec.name}" has neither an image (for replicas) nor endpoints to route to`)
  }
  const seen = new Set<number>()
  spec.ports.forEach((p, i) => {
    if (seen.has(p.port)) throw invalid(where, `${at(`ports[${i}].port`)}: port ${p.port} is listed twice`)
    seen.add(p.port)
    if (p.protocol === 'tcp' && p.gatewayPort === undefined) throw invalid(where, `${at(`ports[${i}]`)}: a tcp port needs a gatewayPort, the port the gateway listens on for it`)
    if (p.protocol === 'http' && p.gatewayPort !== undefined) throw invalid(where, `${at(`ports[${i}]`)}: an http port is reached through the gateway's HTTP port by name; gatewayPort is for tcp ports`)
  })
  if (spec.ports.filter((p) => p.protocol === 'http').length > 1) throw invalid(where, `${at('ports')}: at most one http port per service (the gateway routes HTTP by service name)`)
  const check = spec.healthCheck
  if (check?.port !== undefined && !seen.has(check.port)) throw invalid(where, `${at('healthCheck.port')}: ${check.port} is not one of the service's ports`)
  const lb = spec.loadBalancing
  if (lb.strategy === 'consistent-hash' && lb.hashOn === undefined) throw invalid(where, `${at('loadBalancing.hashOn')}: consistent-hash needs hashOn (header:NAME, cookie:NAME, path or client-address)`)
  if (lb.strategy !== 'consistent-hash' && lb.hashOn !== undefined) throw invalid(where, `${at('loadBalancing.hashOn')}: only the consistent-hash strategy hashes; drop hashOn or change the strategy`)
  if (spec.image === undefined && (spec.replicas.min > 0 || spec.autoscale !== undefined)) {
    throw invalid(where, `service "${spec.name}" has no image, so it cannot have replicas: drop replicas.min (or set it to 0) and autoscale, or give an image`)
  }
  if (spec.image === undefined) spec.replicas = { min: 0, max: 0 }
  const hosts = new Set<string>()
  for (const e of spec.endpoints) {
    if (hosts.has(e.host)) throw invalid(where, `${at('endpoints')}: ${e.host} is listed twice`)
    hosts.add(e.host)
  }
  checkVolumes(spec, input, where, at)
  return spec
}

/**
 * A service's volumes: per-replica ones with a size, shared ones read-only,
 * no name or path twice. Replicas with volumes boot from their image: a
 * clone resumes its template's devices, so every clone would share the
 * template's disk. Without a startPath the service gets `cold`; an explicit
 * clone or pool is refused.
 */
function checkVolumes (spec: ServiceSpec, input: unknown, where: string, at: (field: string) => string): void {
  if ((spec.volumes ?? []).length === 0) return
  if (spec.image === undefined) throw invalid(where, `${at('volumes')}: a service without an image has no replicas to attach volumes to`)
  const given = typeof input === 'object' && input !== null && 'startPath' in input
  if (!given) spec.startPath = 'cold'
  if (spec.startPath !== 'cold') {
    throw new UigniterError('UIG_ERR_VOLUME_TEMPLATE', `service "${spec.name}" has volumes, so its replicas cannot be ${spec.startPath === 'pool' ? 'claimed from a clone pool' : 'cloned from a template'}: every clone would share the template's disk; set startPath: cold (the default for a service with volumes)`)
  }
  const names = new Set<string>()
  const paths = new Set<string>()
  spec.volumes.forEach((v, i) => {
    const field = at(`volumes[${i}]`)
    const path = v.guestPath.replace(/\/+$/, '')
    if (path === '' || posix.normalize(path) !== path) throw invalid(where, `${field}.guestPath: "${v.guestPath}" must be a normalized absolute path other than "/", such as /data`)
    if (names.has(v.name)) throw invalid(where, `${field}.name: volume ${v.name} is listed twice`)
    if (paths.has(path)) throw invalid(where, `${field}.guestPath: ${path} is used by two volumes`)
    names.add(v.name)
    paths.add(path)
    if (v.perReplica && v.sizeMiB === undefined) throw invalid(where, `${field}.sizeMiB: a per-replica volume needs the size each replica's volume is made with`)
    if (!v.perReplica && v.sizeMiB !== undefined) throw invalid(where, `${field}.sizeMiB: a shared volume exists already ("uigniter volume create"); its size is its own. Drop sizeMiB, or set perReplica: true`)
    if (!v.perReplica && v.readOnly === false) throw invalid(where, `${field}.readOnly: a shared volume is attached to every replica, so it must be read-only (a read-write volume attaches to one VM); use perReplica: true for a volume each replica writes`)
  })
}

function hasField (input: unknown, object: string, field: string): boolean {
  const inner = (input as Record<string, unknown> | null)?.[object]
  return typeof inner === 'object' && inner !== null && field in inner
}

/**
 * Validates an application: each service, then what spans services (unique
 * names and gateway ports).
 */
export function parseAppFile (input: unknown, gatewayHttpPort?: number): AppFile {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) throw invalid('', 'an application file holds an object with `app` and `services`')
  const { app, services, ...extra } = input as Record<string, unknown>
  const unknown = Object.keys(extra)
  if (unknown.length > 0) throw invalid('', `unknown field ${unknown.map((k) => `"${k}"`).join(', ')}; an application file has \`app\` and \`services\``)
  if (typeof app !== 'string' || !SERVICE_NAME.test(app)) throw invalid('', 'app: the application\'s name is required: lowercase letters, digits and dashes, starting with a letter, up to 31 characters')
  if (!Array.isArray(services) || services.length === 0 || services.length > 100) throw invalid('', 'services: a list of 1 to 100 service specs is required')
  const parsed: AppFile = { app, services: services.map((s, i) => parseServiceSpec(s, `services[${i}]`)) }
  const names = new Set<string>()
  for (const s of parsed.services) {
    if (names.has(s.name)) throw invalid('', `service "${s.name}" is declared twice`)
    names.add(s.name)
  }
  checkGatewayPorts(parsed.services, gatewayHttpPort)
  return parsed
}

/** Two services cannot share a gateway TCP port, nor take the gateway's HTTP port. */
export function checkGatewayPorts (services: ServiceSpec[], gatewayHttpPort?: number): void {
  const owners = new Map<number, string>()
  for (const s of services) {
    for (const p of s.ports) {
      if (p.gatewayPort === undefined) continue
      if (p.gatewayPort === gatewayHttpPort) throw new UigniterError('UIG_ERR_SERVICE_CONFLICT', `service "${s.name}": gatewayPort ${p.gatewayPort} is the gateway's HTTP port; pick another`)
      const owner = owners.get(p.gatewayPort)
      if (owner !== undefined) throw new UigniterError('UIG_ERR_SERVICE_CONFLICT', `services "${owner}" and "${s.name}" both ask for gatewayPort ${p.gatewayPort}`)
      owners.set(p.gatewayPort, s.name)
    }
  }
}

/**
 * Reads an application file's text: YAML, or JSON (which YAML includes).
 * Syntax errors name the file, line and column.
 */
export function parseAppText (text: string, file: string, gatewayHttpPort?: number): AppFile {
  let doc: unknown
  try {
    doc = parseYaml(text, { prettyErrors: true, uniqueKeys: true })
  } catch (err) {
    if (err instanceof YAMLParseError) {
      const pos = err.linePos?.[0]
      throw new UigniterError('UIG_ERR_SERVICE_SPEC_INVALID', `${file}${pos !== undefined ? `:${pos.line}:${pos.col}` : ''}: ${err.message.split('\n')[0] ?? err.message}`, { cause: err })
    }
    throw err
  }
  try {
    return parseAppFile(doc, gatewayHttpPort)
  } catch (err) {
    if (err instanceof UigniterError) throw new UigniterError(err.code, `${file}: ${err.message}`, { cause: err })
    throw err
  }
}

/**
 * Whether a change of spec changes what a replica runs, so that replicas
 * must be replaced (a rolling update): image, args, env, resources, ports, volumes.
 * Replicas, strategy, health check, autoscale and hold apply in place.
 */
export function changesReplicas (before: ServiceSpec, after: ServiceSpec): boolean {
  const runs = (s: ServiceSpec): string => JSON.stringify([s.image, s.args ?? null, sortedEntries(s.env), s.resources.vcpus ?? null, s.resources.memoryMiB ?? null, s.ports, s.volumes ?? []])
  return runs(before) !== runs(after)
}

function sortedEntries (record: Record<string, string>): Array<[string, string]> {
  return Object.entries(record).sort(([a], [b]) => a.localeCompare(b))
}

function invalid (where: string, detail: string): UigniterError {
  return new UigniterError('UIG_ERR_SERVICE_SPEC_INVALID', `invalid service${where === '' ? '' : ` (${where})`}: ${detail}`)
}
