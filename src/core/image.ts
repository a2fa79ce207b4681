import { Type, type Static } from '@sinclair/typebox'
import { UigniterError } from './errors.js'

/**
 * Image schemas: the build spec (what the user asks for, from flags or a spec
 * file) and the manifest (what the store records). TypeBox is the single
 * source for their types, their validation and, later, the API's OpenAPI.
 */

const NAME_RE = /^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:\/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$/
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/

export interface ImageRef { name: string; tag: string }

/**
 * Parses `name[:tag]` (docker's rules: lowercase name components separated by
 * `/`, a tag of letters, digits, `_ . -`). The tag defaults to `latest`.
 * @example parseImageRef('examples/hello:v1') // { name: 'examples/hello', tag: 'v1' }
 */
export function parseImageRef (ref: string): ImageRef {
  const colon = ref.lastIndexOf(':')
  const hasTag = colon > ref.lastIndexOf('/')
  const name = hasTag ? ref.slice(0, colon) : ref
  const tag = hasTag ? ref.slice(colon + 1) : 'latest'
  if (name.length === 0 || name.length > 128 || !NAME_RE.test(name)) {
    throw new UigniterError('UIG_ERR_IMAGE_INVALID_NAME',
      `invalid image name "${name}": use lowercase letters, digits and single . _ - between them, / between components, at most 128 characters`)
  }
  if (!TAG_RE.test(tag)) {
    throw new UigniterError('UIG_ERR_IMAGE_INVALID_NAME',
      `invalid image tag "${tag}": use letters, digits, _ . - (not first), at most 128 characters`)
  }
  return { name, tag }
}

export function formatImageRef (ref: ImageRef): string {
  return `${ref.name}:${ref.tag}`
}

export const PortSchema = Type.Object({
  port: Type.Integer({ minimum: 1, maximum: 65535 }),
  protocol: Type.Union([Type.Literal('http'), Type.Literal('tcp')], { default: 'tcp' })
}, { additionalProperties: false })

export const MachineSchema = Type.Object({
  type: Type.Union([Type.Literal('microvm'), Type.Literal('q35'), Type.Literal('pc')], {
    description: 'QEMU machine: microvm for our kernel; q35 or pc for unikernels that need a PC (design.md fact 11)'
  }),
  transport: Type.Union([Type.Literal('mmio'), Type.Literal('pci')], { description: 'virtio transport: mmio on microvm, pci on q35/pc' })
}, { additionalProperties: false })

const Argv = Type.Array(Type.String(), { default: [] })

/** Signals an after-clone hook may send: ones whose default action does not end a process that ignores them, bar the USRs and HUP, which a hooked app handles. */
export const AFTER_CLONE_SIGNALS = ['SIGHUP', 'SIGUSR1', 'SIGUSR2', 'SIGWINCH', 'SIGURG', 'SIGCONT'] as const
const HookTimeout = Type.Optional(Type.Integer({ minimum: 1, maximum: 60_000, description: 'Deadline of the hook in milliseconds (default 5000: under TCG a fresh clone runs the hook\'s code paths translated anew); a clone that misses it is destroyed' }))

/**
 * What a clone's app is told once the clone has taken its own identity, before
 * anything is routed to it: a signal the app acknowledges by writing a byte to
 * fd $UIGNITER_ACK_FD, or an HTTP POST from the host that must answer 2xx.
 */
export const AfterCloneSchema = Type.Union([
  Type.Object({
    kind: Type.Literal('signal'),
    signal: Type.Optional(Type.Union(AFTER_CLONE_SIGNALS.map((s) => Type.Literal(s)), { description: 'Default SIGUSR2' })),
    timeoutMs: HookTimeout
  }, { additionalProperties: false }),
  Type.Object({
    kind: Type.Literal('http'),
    path: Type.String({ pattern: '^/', description: 'POSTed to the clone\'s address; must answer 2xx' }),
    port: Type.Optional(Type.Integer({ minimum: 1, maximum: 65535, description: 'Default: the template\'s probe port (the image\'s first port)' })),
    timeoutMs: HookTimeout
  }, { additionalProperties: false })
], { description: 'After-clone hook' })
export type AfterClone = Static<typeof AfterCloneSchema>

export const BuildSourceSchema = Type.Union([
  Type.Object({
    kind: Type.Literal('elf'),
    path: Type.String({ minLength: 1, description: 'An ELF executable on the host; its shared libraries are resolved from the ELF itself' }),
    args: Argv
  }, { additionalProperties: false }),
  Type.Object({
    kind: Type.Literal('node'),
    dir: Type.String({ minLength: 1, description: 'A Node.js app directory, with its node_modules' }),
    entry: Type.String({ minLength: 1, description: 'The entry script, relative to dir' }),
    args: Argv
  }, { additionalProperties: false }),
  Type.Object({
    kind: Type.Literal('rootfs'),
    dir: Type.String({ minLength: 1, description: 'A directory to use as the root file system' }),
    entrypoint: Type.String({ minLength: 1, pattern: '^/', description: 'Absolute path of the program inside dir' }),
    args: Argv,
    owners: Type.Union([Type.Literal('root'), Type.Literal('keep')], { default: 'root', description: 'root: every file is root\'s in the image; keep: files keep their owners from dir (images pulled from a registry)' })
  }, { additionalProperties: false }),
  Type.Object({
    kind: Type.Literal('unikernel'),
    kernel: Type.String({ minLength: 1, description: 'A bootable kernel: an ELF with a PVH entry, or a bzImage' }),
    disk: Type.Optional(Type.String({ minLength: 1, description: 'A disk image, attached read-only' })),
    cmdline: Type.String({ default: '', description: 'The kernel command line, used as given but for its placeholders {ip} {prefix} {netmask} {gateway} {dns} {hostname}, filled per VM ({{ and }} are literal braces)' })
  }, { additionalProperties: false })
])

export const ImageFormatSchema = Type.Union([
  Type.Literal('initramfs'), Type.Literal('squashfs'), Type.Literal('ext4'), Type.Literal('unikernel')
])
export type ImageFormat = Static<typeof ImageFormatSchema>

/** Where an image pulled from a registry came from: what `image inspect` shows and `up` pulls again. */
export const OriginSchema = Type.Object({
  reference: Type.String({ description: 'The reference in full, e.g. docker.io/library/redis:7' }),
  manifestDigest: Type.String({ pattern: '^sha256:[0-9a-f]{64}$' }),
  layers: Type.Array(Type.String({ pattern: '^sha256:[0-9a-f]{64}$' }), { description: 'The layer digests, base first' })
}, { additionalProperties: false })
export type ImageOrigin = Static<typeof OriginSchema>

export const BuildSpecSchema = Type.Object({
  name: Type.String({ minLength: 1, description: 'name[:tag]' }),
  source: BuildSourceSchema,
  format: Type.Union([Type.Literal('auto'), Type.Literal('initramfs'), Type.Literal('squashfs'), Type.Literal('ext4')], { default: 'auto' }),
  env: Type.Record(Type.String({ pattern: '^[A-Za-z_][A-Za-z0-9_]*$' }), Type.String(), { additionalProperties: false, default: {} }),
  workdir: Type.Optional(Type.String({ pattern: '^/' })),
  vcpus: Type.Integer({ minimum: 1, maximum: 64, default: 1 }),
  memoryMiB: Type.Integer({ minimum: 32, maximum: 65536, default: 128 }),
  ports: Type.Array(PortSchema, { default: [] }),
  machine: Type.Optional(MachineSchema),
  afterClone: Type.Optional(Type.Union([AfterCloneSchema, Type.Null()], { description: 'The after-clone hook of clones of this image (node images: SIGUSR2, answered by the clone-safety preload); null for none' })),
  cloneSafe: Type.Optional(Type.Boolean({ description: 'The app holds no generator state a clone could share (true: no warning for ready: app templates). Node images: false leaves the clone-safety preload out' })),
  user: Type.Optional(Type.Object({ uid: Type.Integer({ minimum: 0, maximum: 2147483647 }), gid: Type.Integer({ minimum: 0, maximum: 2147483647 }) }, { additionalProperties: false, description: 'The uid and gid the app runs as (default root)' })),
  stopSignal: Type.Optional(Type.String({ pattern: '^SIG[A-Z0-9]+$', description: 'The signal of a graceful stop (default SIGTERM)' })),
  labels: Type.Optional(Type.Record(Type.String(), Type.String())),
  overlaySizeMiB: Type.Optional(Type.Integer({ minimum: 16, maximum: 1048576, description: 'Booted VMs of this image get a writable overlay of this size unless the request says otherwise (container images expect a writable root)' })),
  origin: Type.Optional(OriginSchema)
}, { additionalProperties: false })
export type BuildSpec = Static<typeof BuildSpecSchema>

const Digest = Type.String({ pattern: '^sha256:[0-9a-f]{64}$' })
const Blob = Type.Object({ digest: Digest, size: Type.Integer({ minimum: 0 }) }, { additionalProperties: false })

export const ImageManifestSchema = Type.Object({
  schemaVersion: Type.Literal(1),
  name: Type.String(),
  tag: Type.String(),
  digest: Digest,
  size: Type.Integer({ minimum: 0, description: 'Bytes of every blob the image boots from' }),
  format: ImageFormatSchema,
  kernel: Type.Object({
    source: Type.Union([Type.Literal('build'), Type.Literal('debian-cloud'), Type.Literal('image')]),
    version: Type.String(),
    blob: Blob
  }, { additionalProperties: false }),
  rootfs: Type.Optional(Blob),
  init: Type.Union([Type.Object({ version: Type.Integer(), digest: Digest }, { additionalProperties: false }), Type.Null()]),
  cmdline: Type.String({ description: 'Kernel command line of the image (the driver adds console and network parameters)' }),
  entrypoint: Type.Array(Type.String()),
  env: Type.Record(Type.String(), Type.String()),
  workdir: Type.String(),
  vcpus: Type.Integer({ minimum: 1 }),
  memoryMiB: Type.Integer({ minimum: 32 }),
  ports: Type.Array(PortSchema),
  machine: MachineSchema,
  afterClone: Type.Optional(AfterCloneSchema),
  cloneSafe: Type.Optional(Type.Boolean({ description: 'Clones of a ready: app template of this image share no generator state, given its afterClone hook runs' })),
  user: Type.Optional(Type.Object({ uid: Type.Integer({ minimum: 0, maximum: 2147483647 }), gid: Type.Integer({ minimum: 0, maximum: 2147483647 }) }, { additionalProperties: false, description: 'The uid and gid the app runs as (default root)' })),
  stopSignal: Type.Optional(Type.String({ pattern: '^SIG[A-Z0-9]+$', description: 'The signal of a graceful stop (default SIGTERM)' })),
  labels: Type.Optional(Type.Record(Type.String(), Type.String())),
  overlaySizeMiB: Type.Optional(Type.Integer({ minimum: 16, maximum: 1048576, description: 'Booted VMs of this image get a writable overlay of this size unless the request says otherwise (container images expect a writable root)' })),
  origin: Type.Optional(OriginSchema),
  createdAt: Type.String({ description: 'ISO 8601 time of the build' })
}, { additionalProperties: false })
export type ImageManifest = Static<typeof ImageManifestSchema>
