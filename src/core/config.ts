import { readFileSync } from 'node:fs'
import { homedir, hostname } from 'node:os'
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
  }),
  api: Type.Object({
    listen: Type.String({ description: 'host:port of the REST API. Env: UIGNITER_API_LISTEN' }),
    socket: Type.String({ description: 'Unix socket of the REST API (mode 0660). Env: UIGNITER_SOCKET' }),
    token: Type.Optional(Type.String({ minLength: 16, description: 'Bearer token; required when listen is not a loopback address. Env: UIGNITER_TOKEN' }))
  }, { additionalProperties: false }),
  network: Type.Object({
    mode: Type.Union([Type.Literal('bridge'), Type.Literal('user')], { description: '"bridge": a tap per VM on a host bridge (root); "user": QEMU user-mode networking. Env: UIGNITER_NETWORK' }),
    bridge: Type.String({ pattern: '^[a-zA-Z0-9_-]{1,15}$' }),
    subnet: Type.String({ description: 'IPv4 CIDR of the bridge; the first address is the gateway' }),
    nat: Type.Boolean({ description: 'Masquerade VM traffic leaving the host' })
  }, { additionalProperties: false }),
  clones: Type.Object({
    identityTimeoutMs: Type.Integer({ minimum: 1, maximum: 600_000, description: 'How long a clone has to take its own identity before it is destroyed. Env: UIGNITER_CLONE_IDENTITY_TIMEOUT_MS' })
  }, { additionalProperties: false }),
  jail: Type.Object({
    enabled: Type.Union([Type.Literal('auto'), Type.Boolean()], { description: 'Jail every QEMU: its own uid, a chroot, seccomp, its own cgroup (docs/jail.md). "auto": on when running as root with bridge networking. Env: UIGNITER_JAIL (auto, true, false)' }),
    uidBase: Type.Integer({ minimum: 1, maximum: 4_294_000_000, description: 'The first uid given to a jailed QEMU; each running VM gets its own' }),
    uidCount: Type.Integer({ minimum: 1, maximum: 1_000_000, description: 'How many uids from uidBase: the most jailed VMs at once' }),
    gid: Type.Integer({ minimum: 1, maximum: 4_294_000_000, description: 'The group of every jailed QEMU: a shared directory must be readable (writable) by it' }),
    memoryOverheadMiB: Type.Integer({ minimum: 0, maximum: 65_536, description: 'Added to a VM\'s memory for its cgroup\'s limit: what QEMU needs beyond the guest\'s RAM' }),
    pidsMax: Type.Integer({ minimum: 16, maximum: 65_536, description: 'Threads a jailed QEMU may have (its cgroup\'s pids.max)' })
  }, { additionalProperties: false }),
  cluster: Type.Object({
    etcd: Type.Array(Type.String({ pattern: '^https?://[^\\s/]+$' }), { maxItems: 9, description: 'etcd client URLs (http://host:2379). Empty: a single host, no cluster. Env: UIGNITER_ETCD (comma-separated)' }),
    node: Type.String({ pattern: '^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$', description: 'This node\'s name in the cluster; default: the host name. Env: UIGNITER_NODE' }),
    address: Type.String({ description: 'This node\'s address on the network the nodes share: the next hop to its VMs, and where its API is reached (api.listen\'s port). Env: UIGNITER_NODE_ADDRESS' }),
    labels: Type.Record(Type.String({ pattern: '^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62}[A-Za-z0-9])?$' }), Type.String({ maxLength: 63, pattern: '^[A-Za-z0-9._-]*$' }), { description: 'Labels for placement rules (nodeSelector). Env: UIGNITER_NODE_LABELS (k=v,k=v)' }),
    subnetRange: Type.String({ description: 'Every node takes its VM subnet (a /24) out of this range; network.subnet (UIGNITER_SUBNET) may name the one it wants' }),
    leaseTtlS: Type.Integer({ minimum: 2, maximum: 60, description: 'A node that stops renewing its lease this long is lost, and its replicas placed elsewhere' }),
    scoring: Type.Union([Type.Literal('least-allocated'), Type.Literal('most-allocated')], { description: 'least-allocated spreads replicas over the emptiest nodes; most-allocated packs them' }),
    preferLocalEndpoints: Type.Boolean({ description: 'The gateway routes to endpoints on its own node when it has healthy ones there' }),
    capacity: Type.Object({
      vcpus: Type.Optional(Type.Integer({ minimum: 1, maximum: 100_000, description: 'Default: 4 per host CPU (idle guests cost little). Env: UIGNITER_NODE_VCPUS' })),
      memoryMiB: Type.Optional(Type.Integer({ minimum: 64, maximum: 100_000_000, description: 'Default: host memory less 1 GiB. Env: UIGNITER_NODE_MEMORY_MIB' }))
    }, { additionalProperties: false })
  }, { additionalProperties: false }),
  registries: Type.Object({
    insecure: Type.Array(Type.String({ pattern: '^(?:\\[[0-9A-Fa-f:.]+\\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$' }), {
      maxItems: 64,
      description: 'Registries (host[:port], as in an image reference; no scheme) pulled over plain HTTP, as --insecure does for one command. Env: UIGNITER_INSECURE_REGISTRIES (comma-separated)'
    }),
    credentials: Type.Optional(Type.String({ minLength: 1, description: 'Registry credentials in Docker\'s config.json format, used when a pull names no --credentials. Env: UIGNITER_REGISTRY_CREDENTIALS' }))
  }, { additionalProperties: false }),
  gateway: Type.Object({
    address: Type.String({ minLength: 1, description: 'Host address the service gateway listens on, for its HTTP port and every service\'s TCP port; guests reach it on the bridge\'s gateway address. Env: UIGNITER_GATEWAY_ADDRESS' }),
    httpPort: Type.Integer({ minimum: 1, maximum: 65535, description: 'The gateway\'s HTTP port: routes by Host header or /svc/NAME/ prefix. Env: UIGNITER_GATEWAY_HTTP_PORT' })
  }, { additionalProperties: false })
}, { additionalProperties: false })

export type Config = Readonly<Static<typeof ConfigSchema>>

/** The single host's VM subnet; a cluster node that keeps it takes a subnet from the cluster range instead. */
export const DEFAULT_SUBNET = '10.77.0.0/24'

function defaults (): Static<typeof ConfigSchema> {
  const root = process.getuid?.() === 0
  return {
    dataDir: root ? '/var/lib/uigniter' : join(homedir(), '.local/share/uigniter'),
    cacheDir: root ? '/var/cache/uigniter' : join(homedir(), '.cache/uigniter'),
    kernel: { source: 'build' },
    accel: 'auto',
    api: { listen: '127.0.0.1:7377', socket: root ? '/run/uigniter/uigniter.sock' : join(homedir(), '.local/share/uigniter/uigniter.sock') },
    network: { mode: root ? 'bridge' : 'user', bridge: 'uigniter0', subnet: DEFAULT_SUBNET, nat: true },
    clones: { identityTimeoutMs: 5000 },
    // 96 MiB: QEMU's own peak beyond guest RAM measured here (TCG, our guests) was under 70 MiB (docs/jail.md).
    jail: { enabled: 'auto', uidBase: 640_000, uidCount: 10_000, gid: 640_000, memoryOverheadMiB: 96, pidsMax: 256 },
    gateway: { address: '0.0.0.0', httpPort: 7380 },
    registries: { insecure: [] },
    cluster: { etcd: [], node: defaultNodeName(), address: '', labels: {}, subnetRange: '10.78.0.0/16', leaseTtlS: 5, scoring: 'least-allocated', preferLocalEndpoints: false, capacity: {} }
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
  if (typeof fromFile !== 'object' || fromFile === null || Array.isArray(fromFile)) {
    throw new UigniterError('UIG_ERR_CONFIG_INVALID', `config file ${file} must hold a JSON object`)
  }
  // One level deep: a file may set `api.token` alone and keep the other api defaults.
  const merged: Record<string, unknown> = { ...defaults() }
  for (const [key, value] of Object.entries(fromFile)) {
    const base = merged[key]
    merged[key] = isPlainObject(base) && isPlainObject(value) ? { ...base, ...value } : value
  }
  if (env.UIGNITER_DATA_DIR !== undefined) merged.dataDir = env.UIGNITER_DATA_DIR
  if (env.UIGNITER_CACHE_DIR !== undefined) merged.cacheDir = env.UIGNITER_CACHE_DIR
  if (env.UIGNITER_ACCEL !== undefined) merged.accel = env.UIGNITER_ACCEL
  if (env.UIGNITER_KERNEL_SOURCE !== undefined) merged.kernel = { source: env.UIGNITER_KERNEL_SOURCE }
  const api = { ...(merged.api as object) } as Record<string, unknown>
  if (env.UIGNITER_API_LISTEN !== undefined) api.listen = env.UIGNITER_API_LISTEN
  if (env.UIGNITER_SOCKET !== undefined) api.socket = env.UIGNITER_SOCKET
  if (env.UIGNITER_TOKEN !== undefined) api.token = env.UIGNITER_TOKEN
  merged.api = api
  if (env.UIGNITER_NETWORK !== undefined) merged.network = { ...(merged.network as object), mode: env.UIGNITER_NETWORK }
  if (env.UIGNITER_BRIDGE !== undefined) merged.network = { ...(merged.network as object), bridge: env.UIGNITER_BRIDGE }
  if (env.UIGNITER_SUBNET !== undefined) merged.network = { ...(merged.network as object), subnet: env.UIGNITER_SUBNET }
  if (env.UIGNITER_CLONE_IDENTITY_TIMEOUT_MS !== undefined) {
    // A number where one is due; anything else stays a string, and the schema check names it.
    const ms = /^\d+$/.test(env.UIGNITER_CLONE_IDENTITY_TIMEOUT_MS) ? Number(env.UIGNITER_CLONE_IDENTITY_TIMEOUT_MS) : env.UIGNITER_CLONE_IDENTITY_TIMEOUT_MS
    merged.clones = { ...(merged.clones as object), identityTimeoutMs: ms }
  }
  if (env.UIGNITER_JAIL !== undefined) {
    const value = env.UIGNITER_JAIL === 'true' ? true : env.UIGNITER_JAIL === 'false' ? false : env.UIGNITER_JAIL
    merged.jail = { ...(merged.jail as object), enabled: value }
  }
  if (env.UIGNITER_GATEWAY_ADDRESS !== undefined) merged.gateway = { ...(merged.gateway as object), address: env.UIGNITER_GATEWAY_ADDRESS }
  if (env.UIGNITER_GATEWAY_HTTP_PORT !== undefined) {
    const port = /^\d+$/.test(env.UIGNITER_GATEWAY_HTTP_PORT) ? Number(env.UIGNITER_GATEWAY_HTTP_PORT) : env.UIGNITER_GATEWAY_HTTP_PORT
    merged.gateway = { ...(merged.gateway as object), httpPort: port }
  }
  if (env.UIGNITER_INSECURE_REGISTRIES !== undefined) {
    merged.registries = { ...(merged.registries as object), insecure: env.UIGNITER_INSECURE_REGISTRIES.split(',').map((r) => r.trim()).filter((r) => r !== '') }
  }
  if (env.UIGNITER_REGISTRY_CREDENTIALS !== undefined) merged.registries = { ...(merged.registries as object), credentials: env.UIGNITER_REGISTRY_CREDENTIALS }
  const cluster = { ...(merged.cluster as object) } as Record<string, unknown>
  if (env.UIGNITER_ETCD !== undefined) cluster.etcd = env.UIGNITER_ETCD.split(',').map((u) => u.trim()).filter((u) => u !== '')
  if (env.UIGNITER_NODE !== undefined) cluster.node = env.UIGNITER_NODE
  if (env.UIGNITER_NODE_ADDRESS !== undefined) cluster.address = env.UIGNITER_NODE_ADDRESS
  if (env.UIGNITER_NODE_LABELS !== undefined) cluster.labels = parseLabels(env.UIGNITER_NODE_LABELS)
  const capacity = { ...(cluster.capacity as object) } as Record<string, unknown>
  if (env.UIGNITER_NODE_VCPUS !== undefined) capacity.vcpus = /^\d+$/.test(env.UIGNITER_NODE_VCPUS) ? Number(env.UIGNITER_NODE_VCPUS) : env.UIGNITER_NODE_VCPUS
  if (env.UIGNITER_NODE_MEMORY_MIB !== undefined) capacity.memoryMiB = /^\d+$/.test(env.UIGNITER_NODE_MEMORY_MIB) ? Number(env.UIGNITER_NODE_MEMORY_MIB) : env.UIGNITER_NODE_MEMORY_MIB
  cluster.capacity = capacity
  merged.cluster = cluster
  if (!Value.Check(ConfigSchema, merged)) {
    throw new UigniterError('UIG_ERR_CONFIG_INVALID', `configuration (${file} and UIGNITER_* variables) is invalid: ${describeSchemaErrors(ConfigSchema, merged)}`)
  }
  return Object.freeze(merged)
}

/** `k=v,k=v`; a malformed pair is a config error naming it. */
function parseLabels (text: string): Record<string, string> {
  const labels: Record<string, string> = {}
  for (const pair of text.split(',').map((p) => p.trim()).filter((p) => p !== '')) {
    const eq = pair.indexOf('=')
    if (eq <= 0) throw new UigniterError('UIG_ERR_CONFIG_INVALID', `UIGNITER_NODE_LABELS: "${pair}" is not key=value`)
    labels[pair.slice(0, eq)] = pair.slice(eq + 1)
  }
  return labels
}

/** The host name, made a valid node name (lower case, letters, digits and dashes). */
function defaultNodeName (): string {
  const name = hostname().toLowerCase().replace(/[^a-z0-9-]/g, '-').replace(/^-+|-+$/g, '').slice(0, 32)
  return /^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$/.test(name) ? name : 'node'
}

function isPlainObject (v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}
