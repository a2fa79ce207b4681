import { BlobCache, type BlobProgress } from './blob-cache.js'
import { isConfigType, isIndexType, isManifestType, layerCompression, mediaTypes, type LayerCompression } from './media-types.js'
import { ociError, OciError } from './oci-errors.js'
import { formatReference, isDigest, manifestReference, parseReference, type OciReference } from './reference.js'
import { CredentialsFile } from './registry-auth.js'
import { RegistryClient, type FetchedManifest } from './registry-client.js'

export interface Platform {
  os: string
  architecture: string
  variant?: string
}

export interface PullOptions {
  /** The cache lives under `<dataDir>/oci/`; ignored when `cache` is given. */
  dataDir: string
  /** Share one across pulls so that concurrent pulls of a shared layer download it once. */
  cache?: BlobCache
  /** Plain HTTP: true for any registry, or the registries (`localhost:5000`) that are to be reached so. */
  insecure?: boolean | readonly string[]
  /** A file in Docker's config.json format. */
  credentialsFile?: string
  credentials?: CredentialsFile
  /** Layers downloaded at once; default 3. */
  concurrency?: number
  /** Which manifest of an index to take; default linux/amd64, the only guests we boot. */
  platform?: Platform
  onProgress?: (progress: LayerProgress) => void
  timeoutMs?: number
  /** The client to use, for tests that count its requests; made from the other options otherwise. */
  client?: RegistryClient
}

export interface LayerProgress extends BlobProgress {
  /** The layer's position in the manifest, from 0 (the base). */
  index: number
  count: number
}

export interface PulledLayer {
  digest: string
  mediaType: string
  compression: LayerCompression
  size: number
  path: string
}

/** The image config's fields uigniter reads (the OCI image spec's `config`); the rest stays as served. */
export interface ImageConfig {
  architecture?: string
  os?: string
  config?: {
    User?: string
    ExposedPorts?: Record<string, unknown>
    Env?: string[]
    Entrypoint?: string[] | null
    Cmd?: string[] | null
    WorkingDir?: string
    Labels?: Record<string, string> | null
    StopSignal?: string
  }
  rootfs?: { type: string, diff_ids: string[] }
  [key: string]: unknown
}

export interface PullResult {
  /** The reference in full: `docker.io/library/busybox:latest`. */
  reference: string
  registry: string
  repository: string
  /** The digest of the platform's image manifest (not of an index above it). */
  manifestDigest: string
  manifestMediaType: string
  /** The index or list the manifest was chosen from, when there was one. */
  indexDigest: string | undefined
  configDigest: string
  config: ImageConfig
  layers: PulledLayer[]
  /** What this pull downloaded: blobs fetched, blobs already cached, and downloads resumed from a partial file. */
  stats: { fetched: number, cached: number, resumed: number }
}

interface Descriptor {
  mediaType: string
  digest: string
  size: number
  platform?: Platform
}

const amd64: Platform = { os: 'linux', architecture: 'amd64' }
/** Image configs are a few KB; a "config" of more than this is not one. */
const maxConfigBytes = 16 * 1024 * 1024
const defaultConcurrency = 3

/**
 * Pulls an image from a registry into the blob cache: the manifest (from an
 * index or manifest list, the platform's), its config and its layers, each
 * verified against its digest. Blobs the cache holds are not fetched again;
 * a partial download left by a broken pull is resumed. Everything a layer's
 * conversion needs is checked before the first download, so that an image
 * with a layer we cannot apply leaves nothing behind.
 * @example
 * const image = await pull('127.0.0.1:5000/test/app:v1', { dataDir, insecure: ['127.0.0.1:5000'] })
 * image.layers.map(l => l.path) // base first
 */
export async function pull (input: string | OciReference, options: PullOptions): Promise<PullResult> {
  const ref = typeof input === 'string' ? parseReference(input) : input
  const platform = options.platform ?? amd64
  const cache = options.cache ?? new BlobCache(options.dataDir)
  const client = options.client ?? await makeClient(ref, options)
  const concurrency = options.concurrency ?? defaultConcurrency
  if (!Number.isInteger(concurrency) || concurrency < 1) throw new TypeError('concurrency must be a positive integer')

  let fetched = await client.getManifest(ref.repository, manifestReference(ref))
  if (ref.digest !== undefined && fetched.digest !== ref.digest) {
    throw ociError('digest-mismatch', `registry ${ref.registry} served a manifest for ${formatReference(ref)} that hashes to ${fetched.digest}; it was discarded`)
  }
  let indexDigest: string | undefined
  let doc = parseJson(fetched, formatReference(ref))
  let mediaType = mediaTypeOf(fetched, doc)
  if (isIndexType(mediaType)) {
    indexDigest = fetched.digest
    const chosen = choosePlatform(doc, platform, formatReference(ref))
    fetched = await client.getManifest(ref.repository, chosen.digest)
    if (fetched.digest !== chosen.digest) {
      throw ociError('digest-mismatch', `registry ${ref.registry} served manifest ${chosen.digest} with content that hashes to ${fetched.digest}; it was discarded`)
    }
    doc = parseJson(fetched, chosen.digest)
    mediaType = mediaTypeOf(fetched, doc)
  }
  if (!isManifestType(mediaType)) throw unsupportedManifest(mediaType, formatReference(ref))
  const { config: configDescriptor, layers: layerDescriptors } = readManifest(doc, formatReference(ref))
  if (configDescriptor.size > maxConfigBytes) throw ociError('manifest-unsupported', `the image config of ${formatReference(ref)} is ${configDescriptor.size} bytes, more than an image config can be`)
  const compressions = layerDescriptors.map(l => layerCompression(l.mediaType))

  const stats = { fetched: 0, cached: 0, resumed: 0 }
  const count = (blob: { fetched: boolean, resumedFrom: number }): void => {
    if (blob.fetched) stats.fetched++
    else stats.cached++
    if (blob.resumedFrom > 0) stats.resumed++
  }
  const opener = (digest: string) => async (offset: number) => await client.openBlob(ref.repository, digest, offset)

  const configBlob = await cache.ensure(configDescriptor.digest, configDescriptor.size, opener(configDescriptor.digest))
  count(configBlob)
  const config = parseConfig(await cache.read(configDescriptor.digest), formatReference(ref))
  checkPlatform(config, platform, formatReference(ref))

  const layers: PulledLayer[] = new Array<PulledLayer>(layerDescriptors.length)
  const failures: unknown[] = []
  let next = 0
  const worker = async (): Promise<void> => {
    while (next < layerDescriptors.length) {
      const index = next++
      const layer = layerDescriptors[index] as Descriptor
      try {
        const blob = await cache.ensure(layer.digest, layer.size, opener(layer.digest), (p) => {
          options.onProgress?.({ ...p, index, count: layerDescriptors.length })
        })
        count(blob)
        layers[index] = { digest: layer.digest, mediaType: layer.mediaType, compression: compressions[index] as LayerCompression, size: layer.size, path: blob.path }
      } catch (err) {
        // The other layers go on: whatever completes is kept for the next pull.
        failures.push(err)
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, Math.max(1, layerDescriptors.length)) }, worker))
  if (failures.length > 0) {
    const first = failures.find(f => f instanceof OciError && f.reason === 'digest-mismatch') ?? failures[0]
    throw first
  }
  await cache.put(fetched.digest, fetched.bytes)
  return {
    reference: formatReference(ref),
    registry: ref.registry,
    repository: ref.repository,
    manifestDigest: fetched.digest,
    manifestMediaType: mediaType,
    indexDigest,
    configDigest: configDescriptor.digest,
    config,
    layers,
    stats
  }
}

async function makeClient (ref: OciReference, options: PullOptions): Promise<RegistryClient> {
  const credentials = options.credentials ?? (options.credentialsFile !== undefined ? await CredentialsFile.load(options.credentialsFile) : undefined)
  const insecure = options.insecure === true || (Array.isArray(options.insecure) && options.insecure.includes(ref.registry))
  const found = credentials?.lookup(ref.registry)
  return new RegistryClient({
    registry: ref.registry,
    insecure,
    ...(found !== undefined ? { credentials: found } : {}),
    ...(options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {})
  })
}

function parseJson (m: FetchedManifest, what: string): Record<string, unknown> {
  try {
    const doc: unknown = JSON.parse(m.bytes.toString('utf8'))
    if (typeof doc === 'object' && doc !== null && !Array.isArray(doc)) return doc as Record<string, unknown>
  } catch {
    // Reported below with the media type the registry claimed.
  }
  throw ociError('manifest-unsupported', `the manifest of ${what} (${m.mediaType || 'no media type'}) is not a JSON object`)
}

/** The Content-Type the registry sent, or else the document's own mediaType field (OCI makes it optional). */
function mediaTypeOf (m: FetchedManifest, doc: Record<string, unknown>): string {
  if (typeof doc.mediaType === 'string' && doc.mediaType !== '') return doc.mediaType
  if (m.mediaType !== '' && m.mediaType !== 'application/json') return m.mediaType
  // An OCI manifest or index without mediaType anywhere: tell them apart by shape.
  if (Array.isArray(doc.manifests)) return mediaTypes.ociIndex
  if (Array.isArray(doc.layers)) return mediaTypes.ociManifest
  return m.mediaType
}

function unsupportedManifest (mediaType: string, what: string): OciError {
  const hint = mediaType.includes('manifest.v1') ? ' (Docker schema 1 is deprecated; push the image again with a current tool)' : ''
  return ociError('manifest-unsupported', `the manifest of ${what} has media type ${JSON.stringify(mediaType)}, which is not an OCI or Docker schema 2 image manifest or index${hint}`)
}

function descriptor (value: unknown, what: string): Descriptor {
  const d = value as Partial<Descriptor> | null
  if (typeof d !== 'object' || d === null || typeof d.mediaType !== 'string' || typeof d.digest !== 'string' ||
    typeof d.size !== 'number' || !Number.isSafeInteger(d.size) || d.size < 0) {
    throw ociError('manifest-unsupported', `${what} is not a descriptor with mediaType, digest and size`)
  }
  if (!isDigest(d.digest)) throw ociError('manifest-unsupported', `${what} has digest ${JSON.stringify(d.digest)}; only sha256 digests are verified`)
  return d as Descriptor
}

function choosePlatform (index: Record<string, unknown>, platform: Platform, what: string): Descriptor {
  const manifests = Array.isArray(index.manifests) ? index.manifests.map((m, i) => descriptor(m, `entry ${i} of the index of ${what}`)) : []
  const matches = manifests.filter(m => m.platform?.os === platform.os && m.platform.architecture === platform.architecture &&
    (platform.variant === undefined || m.platform.variant === platform.variant) && isManifestType(m.mediaType))
  const chosen = matches[0]
  if (chosen === undefined) {
    const offered = manifests.filter(m => m.platform !== undefined).map(m => `${m.platform?.os ?? '?'}/${m.platform?.architecture ?? '?'}`).join(', ')
    throw ociError('manifest-unsupported', `${what} has no ${platform.os}/${platform.architecture} image${offered !== '' ? `; it offers ${offered}` : ''}`)
  }
  return chosen
}

function readManifest (doc: Record<string, unknown>, what: string): { config: Descriptor, layers: Descriptor[] } {
  if (doc.schemaVersion !== 2) throw ociError('manifest-unsupported', `the manifest of ${what} has schemaVersion ${JSON.stringify(doc.schemaVersion)}, not 2`)
  const config = descriptor(doc.config, `the config of ${what}`)
  if (!isConfigType(config.mediaType)) {
    throw ociError('manifest-unsupported', `${what} is not a container image: its config has media type ${JSON.stringify(config.mediaType)}`)
  }
  if (!Array.isArray(doc.layers)) throw ociError('manifest-unsupported', `the manifest of ${what} has no layers list`)
  return { config, layers: doc.layers.map((l, i) => descriptor(l, `layer ${i} of ${what}`)) }
}

function parseConfig (bytes: Buffer, what: string): ImageConfig {
  try {
    const doc: unknown = JSON.parse(bytes.toString('utf8'))
    if (typeof doc === 'object' && doc !== null && !Array.isArray(doc)) return doc as ImageConfig
  } catch {
    // Reported below.
  }
  throw ociError('manifest-unsupported', `the image config of ${what} is not a JSON object`)
}

/** A single-platform image for another CPU would pass every check and then fail to run in the guest. */
function checkPlatform (config: ImageConfig, platform: Platform, what: string): void {
  const os = config.os ?? platform.os
  const arch = config.architecture ?? platform.architecture
  if (os !== platform.os || arch !== platform.architecture) {
    throw ociError('manifest-unsupported', `${what} is a ${os}/${arch} image; uigniter runs ${platform.os}/${platform.architecture} guests`)
  }
}
