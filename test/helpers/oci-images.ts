import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { run } from '../../src/core/exec.js'

/** Files of one layer, by path inside the image: text or bytes (mode 0644), or with a mode. */
/** A layer's changes: files to write, and `null` for a file to delete (umoci makes a `.wh.` whiteout of it). */
export type LayerFiles = Record<string, string | Buffer | { data: string | Buffer, mode: number } | null>

export interface OciLayout {
  dir: string
  close: () => Promise<void>
}

/** An empty OCI image layout in a temporary directory (umoci init). */
export async function createLayout (): Promise<OciLayout> {
  const root = await mkdtemp(join(tmpdir(), 'uigniter-oci-'))
  const dir = join(root, 'layout')
  await run('umoci', ['init', '--layout', dir])
  return { dir, close: async () => { await rm(root, { recursive: true, force: true }) } }
}

/**
 * Adds `tag` to the layout: `from`'s layers (or none) and one layer per
 * entry of `layers`, each made by umoci repack from the files written into
 * an unpacked bundle. The first layer of a base image usually holds busybox.
 */
export async function buildImage (layout: OciLayout, tag: string, layers: LayerFiles[], options: { from?: string, entrypoint?: string[], user?: string, ports?: string[] } = {}): Promise<void> {
  const image = `${layout.dir}:${tag}`
  if (options.from !== undefined) await run('umoci', ['tag', '--image', `${layout.dir}:${options.from}`, tag])
  else await run('umoci', ['new', '--image', image])
  const bundle = await mkdtemp(join(tmpdir(), 'uigniter-bundle-'))
  try {
    await rm(bundle, { recursive: true })
    await run('umoci', ['unpack', '--rootless', '--image', image, bundle])
    for (const files of layers) {
      for (const [path, content] of Object.entries(files)) {
        const target = join(bundle, 'rootfs', path)
        if (content === null) { await rm(target, { recursive: true, force: true }); continue }
        await mkdir(dirname(target), { recursive: true })
        if (typeof content === 'string' || Buffer.isBuffer(content)) await writeFile(target, content)
        else {
          await writeFile(target, content.data)
          await chmod(target, content.mode)
        }
      }
      await run('umoci', ['repack', '--refresh-bundle', '--image', image, bundle])
    }
    const config = [
      ...(options.entrypoint ?? []).flatMap(e => ['--config.entrypoint', e]),
      ...(options.user !== undefined ? ['--config.user', options.user] : []),
      ...(options.ports ?? []).flatMap(p => ['--config.exposedports', p])
    ]
    if (config.length > 0) await run('umoci', ['config', '--image', image, ...config])
  } finally {
    await rm(bundle, { recursive: true, force: true })
  }
}

/** A layer holding /bin/busybox from busybox-static (about 1 MB gzipped): big enough to cut a download in the middle. */
export async function busyboxLayer (): Promise<LayerFiles> {
  return { 'bin/busybox': { data: await readFile('/bin/busybox'), mode: 0o755 } }
}

export interface PushOptions {
  /** Docker schema 2 instead of the layout's OCI manifest. */
  format?: 'oci' | 'v2s2'
  /** Recompress the layers (zstd makes tar+zstd layers). */
  compress?: 'gzip' | 'zstd'
}

/** skopeo copy oci:DIR:TAG docker://HOST/NAME over plain HTTP, with basic credentials when the registry asks. */
export async function pushImage (layout: OciLayout, tag: string, registryHost: string, nameAndTag: string, options: PushOptions & { auth?: { username: string, password: string } } = {}): Promise<void> {
  const args = ['copy', '--quiet', '--dest-tls-verify=false']
  if (options.format === 'v2s2') args.push('--format', 'v2s2')
  if (options.format === 'oci') args.push('--format', 'oci')
  if (options.compress !== undefined) args.push('--dest-compress-format', options.compress)
  if (options.auth !== undefined) args.push('--dest-creds', `${options.auth.username}:${options.auth.password}`)
  args.push(`oci:${layout.dir}:${tag}`, `docker://${registryHost}/${nameAndTag}`)
  await run('skopeo', args)
}

/** PUTs a manifest (or index) of our own making, e.g. one with a media type nobody knows. */
export async function putManifest (registryHost: string, name: string, reference: string, mediaType: string, body: string | Buffer): Promise<void> {
  const res = await fetch(`http://${registryHost}/v2/${name}/manifests/${reference}`, {
    method: 'PUT', headers: { 'content-type': mediaType }, body, signal: AbortSignal.timeout(10_000)
  })
  const text = await res.text()
  if (res.status !== 201) throw new Error(`PUT manifest ${name}:${reference} answered ${res.status}: ${text}`)
}

/** GETs a manifest as stored (to build an index or a tampered manifest from it). */
export async function getManifest (registryHost: string, name: string, reference: string, accept: string): Promise<{ mediaType: string, digest: string, body: Buffer }> {
  const res = await fetch(`http://${registryHost}/v2/${name}/manifests/${reference}`, { headers: { accept }, signal: AbortSignal.timeout(10_000) })
  if (res.status !== 200) throw new Error(`GET manifest ${name}:${reference} answered ${res.status}`)
  return { mediaType: res.headers.get('content-type') ?? '', digest: res.headers.get('docker-content-digest') ?? '', body: Buffer.from(await res.arrayBuffer()) }
}
