import { createHash, randomBytes } from 'node:crypto'
import { createReadStream, createWriteStream } from 'node:fs'
import { lstat, mkdir, open, readFile, rm } from 'node:fs/promises'
import { basename, join } from 'node:path'
import type { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { createGunzip } from 'node:zlib'
import tar from 'tar-stream'
import { UigniterError, hasErrno } from '../core/errors.js'
import { parseImageRef } from '../core/image.js'
import { BlobCache } from './blob-cache.js'
import { entryComponents } from './layer-path.js'
import { isConfigType, isIndexType, isManifestType, layerCompression, mediaTypes } from './media-types.js'
import { ociError } from './oci-errors.js'
import type { ImageConfig, Platform, PulledLayer, PullResult } from './pull.js'
import { parseReference } from './reference.js'

export interface ImportOptions {
  /** The cache lives under `<dataDir>/oci/`; ignored when `cache` is given. */
  dataDir: string
  cache?: BlobCache
  /** Which manifest of an index to take; default linux/amd64. */
  platform?: Platform
  /** The image to take from an archive that holds several: an OCI `ref.name` annotation, or a Docker RepoTag (`name:tag`, or the tag). */
  ref?: string
}

export interface ImportResult extends PullResult {
  /** The archive's own name:tag for the image, when it gives one usable as a local image name. */
  imageName: string | undefined
}

/** index.json, manifest.json, manifests and configs are a few KB: more than this is not one. */
export const MAX_METADATA_BYTES = 4 * 1024 * 1024

const amd64: Platform = { os: 'linux', architecture: 'amd64' }
const refNameKey = 'org.opencontainers.image.ref.name'
const blobNameRe = /^blobs\/sha256\/([a-f0-9]{64})$/

interface StoredFile { digest: string, size: number, path: string }

/** An archive's files, by their path inside it; a tar and a directory answer alike. */
interface ArchiveSource {
  readonly what: string
  /** A small file's bytes, or undefined when there is none; one past MAX_METADATA_BYTES is refused. */
  small: (name: string) => Promise<Buffer | undefined>
  /** A file in the blob cache: a blob checked against its name, any other file under the digest of its bytes. */
  stored: (name: string, namedBy: string) => Promise<StoredFile>
}

interface Descriptor { mediaType: string, digest: string, size: number, platform?: Platform, annotations?: Record<string, string> }

/**
 * Reads an image archive into the blob cache and answers as pull() does, so
 * that imageFromPull takes it unchanged: an OCI image layout (a directory, or
 * a tar of one, as `skopeo copy ... oci-archive:` writes) or a `docker save`
 * archive (`manifest.json`). A tar is read as a stream, never extracted: each
 * blob enters the cache through its digest check (an OCI blob's name is its
 * digest; a Docker layer's digest is computed). Entries named `..` or
 * absolutely, duplicate names, device entries, oversized metadata, unknown
 * media types and missing blobs are refused; links among the entries are
 * never followed, and one that the manifest names is refused.
 * @example
 * const image = await readImageArchive('web.tar', { dataDir })
 * await imageFromPull(image, { builder, name: image.imageName ?? 'web:latest', workParent })
 */
export async function readImageArchive (path: string, options: ImportOptions): Promise<ImportResult> {
  const cache = options.cache ?? new BlobCache(options.dataDir)
  const platform = options.platform ?? amd64
  let st
  try {
    st = await lstat(path)
  } catch (err) {
    if (hasErrno(err, 'ENOENT', 'ENOTDIR')) throw new UigniterError('UIG_ERR_IMAGE_PATH_NOT_FOUND', `${path} does not exist: give an OCI layout directory, or a tar from docker save or skopeo`)
    throw err
  }
  const source = st.isDirectory() ? directorySource(path, cache) : st.isFile() ? await scanTar(path, cache) : undefined
  if (source === undefined) throw new UigniterError('UIG_ERR_IMAGE_PATH_UNREADABLE', `${path} is neither a directory nor a regular file`)
  const label = basename(path.replace(/\/+$/, ''))
  if (await source.small('oci-layout') !== undefined) return await fromLayout(source, label, cache, platform, options.ref)
  if (await source.small('manifest.json') !== undefined) return await fromDockerArchive(source, label, cache, platform, options.ref)
  throw ociError('manifest-unsupported', `${source.what} is not an image archive: it has neither oci-layout (an OCI image layout) nor manifest.json (docker save)`)
}

async function fromLayout (source: ArchiveSource, label: string, cache: BlobCache, platform: Platform, ref: string | undefined): Promise<ImportResult> {
  const layout = jsonObject(await source.small('oci-layout'), `oci-layout of ${source.what}`)
  if (typeof layout.imageLayoutVersion !== 'string' || !layout.imageLayoutVersion.startsWith('1.')) {
    throw ociError('manifest-unsupported', `${source.what} is OCI image layout version ${JSON.stringify(layout.imageLayoutVersion)}; uigniter reads 1.x`)
  }
  const index = jsonObject(await source.small('index.json'), `index.json of ${source.what}`)
  const entries = descriptors(index.manifests, `index.json of ${source.what}`)
  let chosen = chooseEntry(entries, ref, platform, source.what)
  const refName = chosen.annotations?.[refNameKey]
  let indexDigest: string | undefined
  if (isIndexType(chosen.mediaType)) {
    indexDigest = chosen.digest
    const nested = jsonObject(await readBlob(source, cache, chosen, 'index.json'), `index ${chosen.digest}`)
    chosen = choosePlatform(descriptors(nested.manifests, `index ${chosen.digest}`), platform, source.what)
  }
  if (!isManifestType(chosen.mediaType)) throw ociError('manifest-unsupported', `${source.what} names ${chosen.digest} with media type ${JSON.stringify(chosen.mediaType)}, not an image manifest or index`)
  const manifest = jsonObject(await readBlob(source, cache, chosen, 'index.json'), `manifest ${chosen.digest}`)
  if (manifest.schemaVersion !== 2) throw ociError('manifest-unsupported', `manifest ${chosen.digest} has schemaVersion ${JSON.stringify(manifest.schemaVersion)}, not 2`)
  const configDescriptor = descriptor(manifest.config, `the config of ${chosen.digest}`)
  if (!isConfigType(configDescriptor.mediaType)) throw ociError('manifest-unsupported', `${source.what} is not a container image: its config has media type ${JSON.stringify(configDescriptor.mediaType)}`)
  const layerDescriptors = descriptors(manifest.layers, `the layers of ${chosen.digest}`)
  // Before any layer is read: an image with a layer we cannot apply is refused at once.
  const compressions = layerDescriptors.map((l) => layerCompression(l.mediaType))
  const config = configOf(await readBlob(source, cache, configDescriptor, chosen.digest), source.what, platform)
  const layers: PulledLayer[] = []
  for (const [i, l] of layerDescriptors.entries()) {
    const path = await blobPath(source, l, chosen.digest)
    layers.push({ digest: l.digest, mediaType: l.mediaType, compression: compressions[i] ?? 'none', size: l.size, path })
  }
  const imageName = refName === undefined ? undefined : nameFromRefName(refName, label)
  return result(label, refName, imageName, { manifestDigest: chosen.digest, manifestMediaType: chosen.mediaType, indexDigest, configDigest: configDescriptor.digest, config, layers })
}

interface DockerEntry { Config: string, RepoTags: string[] | null, Layers: string[] }

async function fromDockerArchive (source: ArchiveSource, label: string, cache: BlobCache, platform: Platform, ref: string | undefined): Promise<ImportResult> {
  const doc = parseJson(await source.small('manifest.json'), `manifest.json of ${source.what}`)
  const valid = Array.isArray(doc) && doc.length > 0 && doc.every((e: Partial<DockerEntry> | null) =>
    typeof e === 'object' && e !== null && typeof e.Config === 'string' && Array.isArray(e.Layers) && e.Layers.every((l) => typeof l === 'string') &&
    (e.RepoTags === undefined || e.RepoTags === null || (Array.isArray(e.RepoTags) && e.RepoTags.every((t) => typeof t === 'string'))))
  if (!valid) throw ociError('manifest-unsupported', `manifest.json of ${source.what} is not a list of { Config, RepoTags, Layers }`)
  const images = doc as DockerEntry[]
  const tagsOf = (e: DockerEntry): string[] => e.RepoTags ?? []
  const matching = ref === undefined ? images : images.filter((e) => tagsOf(e).some((t) => t === ref || shortName(t) === ref || t.endsWith(`:${ref}`)))
  const entry = matching[0]
  if (entry === undefined) throw ociError('not-found', `${source.what} has no image tagged ${JSON.stringify(ref)}; it holds ${images.map((e) => tagsOf(e).join(', ') || '(untagged)').join('; ')}`)
  if (matching.length > 1) throw ociError('manifest-unsupported', `${source.what} holds ${matching.length} images (${matching.map((e) => tagsOf(e).join(', ') || '(untagged)').join('; ')}); choose one with --ref TAG`)

  const configFile = await source.stored(entry.Config, 'manifest.json')
  if (configFile.size > MAX_METADATA_BYTES) throw tooLarge(source.what, entry.Config)
  const configBytes = await readFile(configFile.path)
  const config = configOf(configBytes, source.what, platform)
  const diffIds = config.rootfs?.diff_ids ?? []
  if (diffIds.length !== entry.Layers.length) {
    throw ociError('manifest-unsupported', `the config of ${source.what} lists ${diffIds.length} layer(s) and manifest.json ${entry.Layers.length}`)
  }
  const layers: PulledLayer[] = []
  for (const [i, name] of entry.Layers.entries()) {
    const file = await source.stored(name, 'manifest.json')
    const compression = await sniffCompression(file.path)
    // An uncompressed layer's digest is its diff_id: one that differs is not the layer the config describes.
    if (compression === 'none' && file.digest !== diffIds[i]) {
      throw ociError('digest-mismatch', `layer ${name} of ${source.what} hashes to ${file.digest}, not the ${String(diffIds[i])} its config gives; the archive was refused`)
    }
    const mediaType = compression === 'gzip' ? 'application/vnd.oci.image.layer.v1.tar+gzip' : compression === 'zstd' ? 'application/vnd.oci.image.layer.v1.tar+zstd' : 'application/vnd.oci.image.layer.v1.tar'
    layers.push({ digest: file.digest, mediaType, compression, size: file.size, path: file.path })
  }
  // A docker archive has no image manifest: one is made, so that the image's origin has a manifest digest as a pulled one does.
  const manifest = Buffer.from(JSON.stringify({
    schemaVersion: 2,
    mediaType: mediaTypes.ociManifest,
    config: { mediaType: mediaTypes.ociConfig, digest: configFile.digest, size: configFile.size },
    layers: layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.size }))
  }))
  const manifestDigest = sha256(manifest)
  await cache.put(manifestDigest, manifest)
  const tag = tagsOf(entry)[0]
  const imageName = tag === undefined ? undefined : nameFromRefName(tag, label)
  return result(label, tag, imageName, { manifestDigest, manifestMediaType: mediaTypes.ociManifest, indexDigest: undefined, configDigest: configFile.digest, config, layers })
}

function result (label: string, ownRef: string | undefined, imageName: string | undefined,
  parts: Pick<PullResult, 'manifestDigest' | 'manifestMediaType' | 'indexDigest' | 'configDigest' | 'config' | 'layers'>): ImportResult {
  return {
    reference: `archive:${label}${ownRef !== undefined ? `:${ownRef}` : ''}`,
    registry: '',
    repository: imageName !== undefined ? parseImageRef(imageName).name : label,
    ...parts,
    stats: { fetched: 0, cached: 0, resumed: 0 },
    imageName
  }
}

/** The index entry to take: the one `ref` names, the only one, or the only one for the platform. */
function chooseEntry (entries: Descriptor[], ref: string | undefined, platform: Platform, what: string): Descriptor {
  const names = entries.map((e) => e.annotations?.[refNameKey] ?? '(unnamed)')
  if (ref !== undefined) {
    const named = entries.filter((e) => { const n = e.annotations?.[refNameKey]; return n === ref || (n !== undefined && n.endsWith(`:${ref}`)) })
    if (named.length === 1) return named[0] as Descriptor
    if (named.length === 0) throw ociError('not-found', `${what} has no image named ${JSON.stringify(ref)}; it holds ${names.join(', ') || 'none'}`)
    return choosePlatform(named, platform, what)
  }
  if (entries.length === 1) return entries[0] as Descriptor
  if (entries.length === 0) throw ociError('manifest-unsupported', `index.json of ${what} lists no image`)
  const forPlatform = entries.filter((e) => e.platform !== undefined && matchesPlatform(e.platform, platform))
  if (forPlatform.length === 1 && new Set(names).size === 1) return forPlatform[0] as Descriptor
  throw ociError('manifest-unsupported', `${what} holds ${entries.length} images (${names.join(', ')}); choose one with --ref TAG`)
}

function choosePlatform (entries: Descriptor[], platform: Platform, what: string): Descriptor {
  const chosen = entries.find((e) => e.platform !== undefined && matchesPlatform(e.platform, platform) && isManifestType(e.mediaType))
  if (chosen === undefined) {
    const offered = entries.filter((e) => e.platform !== undefined).map((e) => `${e.platform?.os ?? '?'}/${e.platform?.architecture ?? '?'}`).join(', ')
    throw ociError('manifest-unsupported', `${what} has no ${platform.os}/${platform.architecture} image${offered !== '' ? `; it offers ${offered}` : ''}`)
  }
  return chosen
}

function matchesPlatform (p: Platform, want: Platform): boolean {
  return p.os === want.os && p.architecture === want.architecture && (want.variant === undefined || p.variant === want.variant)
}

async function blobPath (source: ArchiveSource, d: Descriptor, namedBy: string): Promise<string> {
  const file = await source.stored(`blobs/sha256/${d.digest.slice(7)}`, namedBy)
  if (file.digest !== d.digest || file.size !== d.size) {
    throw ociError('digest-mismatch', `blob ${d.digest} of ${source.what} is ${file.size} bytes, not the ${d.size} that ${namedBy} gives; the archive was refused`)
  }
  return file.path
}

async function readBlob (source: ArchiveSource, cache: BlobCache, d: Descriptor, namedBy: string): Promise<Buffer> {
  if (d.size > MAX_METADATA_BYTES) throw tooLarge(source.what, d.digest)
  await blobPath(source, d, namedBy)
  return await cache.read(d.digest)
}

function configOf (bytes: Buffer, what: string, platform: Platform): ImageConfig {
  const config = jsonObject(bytes, `the image config of ${what}`) as ImageConfig
  // An image for another CPU would pass every check and then fail to run in the guest.
  const os = config.os ?? platform.os
  const arch = config.architecture ?? platform.architecture
  if (os !== platform.os || arch !== platform.architecture) {
    throw ociError('manifest-unsupported', `${what} holds a ${os}/${arch} image; uigniter runs ${platform.os}/${platform.architecture} guests`)
  }
  return config
}

function descriptors (value: unknown, what: string): Descriptor[] {
  if (!Array.isArray(value)) throw ociError('manifest-unsupported', `${what} has no list of descriptors`)
  return value.map((d, i) => descriptor(d, `entry ${i} of ${what}`))
}

function descriptor (value: unknown, what: string): Descriptor {
  const d = value as Partial<Descriptor> | null
  if (typeof d !== 'object' || d === null || typeof d.mediaType !== 'string' || typeof d.digest !== 'string' ||
    typeof d.size !== 'number' || !Number.isSafeInteger(d.size) || d.size < 0) {
    throw ociError('manifest-unsupported', `${what} is not a descriptor with mediaType, digest and size`)
  }
  if (!/^sha256:[a-f0-9]{64}$/.test(d.digest)) throw ociError('manifest-unsupported', `${what} has digest ${JSON.stringify(d.digest)}; only sha256 digests are verified`)
  return d as Descriptor
}

function parseJson (bytes: Buffer | undefined, what: string): unknown {
  if (bytes === undefined) throw ociError('not-found', `${what} is missing`)
  try {
    return JSON.parse(bytes.toString('utf8'))
  } catch (err) {
    throw ociError('manifest-unsupported', `${what} is not JSON: ${(err as Error).message}`)
  }
}

function jsonObject (bytes: Buffer | undefined, what: string): Record<string, unknown> {
  const doc = parseJson(bytes, what)
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw ociError('manifest-unsupported', `${what} is not a JSON object`)
  return doc as Record<string, unknown>
}

/** `docker.io/library/web:1` → `web:1`; a bare tag (skopeo's `oci:DIR:v1`) takes the archive's name. */
function nameFromRefName (refName: string, label: string): string | undefined {
  let candidate: string
  if (/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/.test(refName)) candidate = `${labelName(label)}:${refName}`
  else {
    try {
      const ref = parseReference(refName)
      candidate = `${ref.repository.split('/').pop() ?? ref.repository}:${ref.tag ?? 'latest'}`
    } catch {
      return undefined
    }
  }
  try {
    parseImageRef(candidate)
    return candidate
  } catch {
    return undefined
  }
}

function shortName (repoTag: string): string | undefined {
  try {
    const ref = parseReference(repoTag)
    return `${ref.repository.split('/').pop() ?? ref.repository}:${ref.tag ?? 'latest'}`
  } catch {
    return undefined
  }
}

function labelName (label: string): string {
  const name = label.replace(/\.(tar|tar\.gz|tgz)$/, '').toLowerCase().replace(/[^a-z0-9._-]+/g, '-').replace(/^[^a-z0-9]+|[^a-z0-9]+$/g, '')
  return name === '' ? 'imported' : name
}

function tooLarge (what: string, name: string): UigniterError {
  return new UigniterError('UIG_ERR_OCI_LAYER_TOO_LARGE', `${name} in ${what} is larger than the ${MAX_METADATA_BYTES / 1024 / 1024} MiB a manifest, index or config may be; the archive was refused`)
}

function unsafeEntry (what: string, name: string, why: string): UigniterError {
  return new UigniterError('UIG_ERR_OCI_LAYER_UNSAFE', `${what}: entry "${name}" ${why}; the archive was refused`)
}

function sha256 (bytes: Buffer): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`
}

/** Docker layers are plain tar, or gzip (and zstd, from newer tools): told apart by their first bytes. */
async function sniffCompression (path: string): Promise<'none' | 'gzip' | 'zstd'> {
  const file = await open(path, 'r')
  try {
    const head = Buffer.alloc(4)
    const { bytesRead } = await file.read(head, 0, 4, 0)
    if (bytesRead >= 2 && head[0] === 0x1f && head[1] === 0x8b) return 'gzip'
    if (bytesRead === 4 && head.readUInt32LE(0) === 0xfd2fb528) return 'zstd'
    return 'none'
  } finally {
    await file.close()
  }
}

/** Puts a stream into the cache under the digest of its bytes, through a file beside the cache that is hashed as it is written. */
async function storeComputed (cache: BlobCache, stream: AsyncIterable<Buffer>): Promise<StoredFile> {
  const dir = join(cache.root, 'import')
  await mkdir(dir, { recursive: true })
  const temp = join(dir, randomBytes(8).toString('hex'))
  try {
    const hash = createHash('sha256')
    let size = 0
    await pipeline(stream, async function * (source: AsyncIterable<Buffer>) {
      for await (const chunk of source) {
        hash.update(chunk)
        size += chunk.length
        yield chunk
      }
    }, createWriteStream(temp))
    const digest = `sha256:${hash.digest('hex')}`
    const { path } = await cache.ensure(digest, size, fileOpener(temp))
    return { digest, size, path }
  } finally {
    await rm(temp, { force: true })
  }
}

function fileOpener (path: string) {
  return async (offset: number) => {
    const chunks = createReadStream(path, { start: offset })
    return await Promise.resolve({ start: offset, chunks: chunks as AsyncIterable<Uint8Array>, cancel: () => { chunks.destroy() } })
  }
}

/** An OCI layout directory: files read where they are, through no symlink. */
function directorySource (dir: string, cache: BlobCache): ArchiveSource {
  const what = `layout ${dir}`
  const locate = async (name: string, namedBy: string): Promise<{ path: string, size: number } | undefined> => {
    const parts = entryComponents(name)
    if (!Array.isArray(parts) || parts.length === 0) throw unsafeEntry(what, name, Array.isArray(parts) ? 'is empty' : `${parts.refused} (named by ${namedBy})`)
    for (let i = 1; i <= parts.length; i++) {
      const path = join(dir, ...parts.slice(0, i))
      let st
      try {
        st = await lstat(path)
      } catch (err) {
        if (hasErrno(err, 'ENOENT', 'ENOTDIR')) return undefined
        throw err
      }
      if (st.isSymbolicLink()) throw unsafeEntry(what, parts.slice(0, i).join('/'), 'is a symlink, which an import does not follow')
      if (i === parts.length) {
        if (!st.isFile()) throw unsafeEntry(what, name, 'is not a regular file')
        return { path, size: st.size }
      }
    }
    return undefined
  }
  return {
    what,
    small: async (name) => {
      const found = await locate(name, 'the layout')
      if (found === undefined) return undefined
      if (found.size > MAX_METADATA_BYTES) throw tooLarge(what, name)
      return await readFile(found.path)
    },
    stored: async (name, namedBy) => {
      const found = await locate(name, namedBy)
      if (found === undefined) throw ociError('not-found', `${what} has no ${name}, which ${namedBy} names`)
      const blob = blobNameRe.exec(name)
      if (blob === null) return await storeComputed(cache, createReadStream(found.path))
      const digest = `sha256:${blob[1] as string}`
      const { path } = await cache.ensure(digest, found.size, fileOpener(found.path))
      return { digest, size: found.size, path }
    }
  }
}

type TarItem = { kind: 'stored', file: StoredFile } | { kind: 'small', bytes: Buffer } | { kind: 'large' } | { kind: 'link', type: string } | { kind: 'skipped' }

/**
 * Reads a tar (or a gzipped one) once, from start to end: blobs go into the
 * cache checked against their names, `.tar` files (Docker layers) under the
 * digest of their bytes, small files are kept in memory, links are noted and
 * never followed. Nothing is written under the archive's own names.
 */
async function scanTar (path: string, cache: BlobCache): Promise<ArchiveSource> {
  const what = `archive ${basename(path)}`
  const items = new Map<string, TarItem>()
  const extract = tar.extract()
  const file = createReadStream(path)
  const gzipped = (await sniffCompression(path)) === 'gzip'
  const input: Readable = gzipped ? file.pipe(createGunzip()) : file
  file.on('error', (err) => { extract.destroy(err) })
  input.on('error', (err) => { extract.destroy(err) })
  input.pipe(extract)
  try {
    for await (const entry of extract as unknown as AsyncIterable<Readable & { header: tar.Header }>) {
      const header = entry.header
      const parts = entryComponents(header.name)
      if (!Array.isArray(parts)) throw unsafeEntry(what, header.name, parts.refused)
      const name = parts.join('/')
      if (header.type === 'directory') { entry.resume(); continue }
      if (items.has(name)) throw unsafeEntry(what, name, 'appears twice (which one would be meant is ambiguous)')
      if (header.type === 'symlink' || header.type === 'link') {
        items.set(name, { kind: 'link', type: header.type === 'link' ? 'a hard link' : 'a symlink' })
        entry.resume()
        continue
      }
      if (header.type !== 'file' && header.type !== 'contiguous-file') throw unsafeEntry(what, name, `is a ${header.type ?? 'special'} entry, which an image archive does not hold`)
      const size = header.size ?? 0
      let consumed = false
      const chunks = (async function * () { consumed = true; for await (const c of entry) yield c as Buffer })()
      const blob = blobNameRe.exec(name)
      if (blob !== null) {
        const digest = `sha256:${blob[1] as string}`
        const stored = await cache.ensure(digest, size, async () => await Promise.resolve({ start: 0, chunks, cancel: () => {} }))
        items.set(name, { kind: 'stored', file: { digest, size, path: stored.path } })
      } else if (name.endsWith('.tar')) {
        items.set(name, { kind: 'stored', file: await storeComputed(cache, chunks) })
      } else if (size <= MAX_METADATA_BYTES) {
        const bufs: Buffer[] = []
        for await (const c of chunks) bufs.push(c)
        items.set(name, { kind: 'small', bytes: Buffer.concat(bufs) })
      } else {
        items.set(name, { kind: 'large' })
      }
      if (!consumed) entry.resume()
    }
  } catch (err) {
    if (err instanceof UigniterError) throw err
    throw new UigniterError('UIG_ERR_OCI_LAYER_INVALID', `${what} is not a valid tar: ${(err as Error).message}`, { cause: err })
  } finally {
    file.destroy()
  }
  const refuseLink = (name: string, item: TarItem): void => {
    if (item.kind === 'link') throw unsafeEntry(what, name, `is ${item.type}, which an import does not follow`)
    if (item.kind === 'large') throw tooLarge(what, name)
  }
  return {
    what,
    small: async (name) => {
      const item = items.get(name)
      if (item === undefined) return undefined
      refuseLink(name, item)
      if (item.kind === 'small') return item.bytes
      if (item.kind === 'stored') {
        if (item.file.size > MAX_METADATA_BYTES) throw tooLarge(what, name)
        return await readFile(item.file.path)
      }
      return undefined
    },
    stored: async (name, namedBy) => {
      const item = items.get(name)
      if (item === undefined) throw ociError('not-found', `${what} has no ${name}, which ${namedBy} names`)
      refuseLink(name, item)
      if (item.kind === 'stored') return item.file
      // A small file (a docker config): stored now, under its digest.
      if (item.kind === 'small') {
        const digest = sha256(item.bytes)
        return { digest, size: item.bytes.length, path: await cache.put(digest, item.bytes) }
      }
      throw ociError('not-found', `${what} has no ${name}, which ${namedBy} names`)
    }
  }
}
