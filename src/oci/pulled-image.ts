import { mkdtemp, rm } from 'node:fs/promises'
import { join } from 'node:path'
import type { ImageManifest } from '../core/image.js'
import type { ImageBuilder } from '../guest/image-builder.js'
import { mapImageConfig } from './image-config.js'
import { applyLayers } from './layer-apply.js'
import type { PullResult } from './pull.js'

/** Container images expect to write to their root: booted VMs of a pulled image get this much overlay unless asked otherwise. */
export const DEFAULT_OVERLAY_MIB = 256

export interface PulledImageOptions {
  builder: ImageBuilder
  /** name[:tag] of the image made. */
  name: string
  /** A directory on the data dir's file system for the applied layers (removed afterwards). */
  workParent: string
  format?: 'auto' | 'squashfs' | 'ext4'
  memoryMiB?: number
  overlaySizeMiB?: number
}

/**
 * Turns a pulled OCI image into a bootable one: its layers applied in order
 * onto an empty root (safely: src/oci/layer-apply.ts), its config mapped
 * (entrypoint and cmd, env, working dir, user, ports, stop signal, labels),
 * then built like a root directory whose files keep their owners, with our
 * init. The image records where it came from (reference, manifest and layer
 * digests). Nothing is left behind when any step fails.
 */
export async function imageFromPull (pulled: PullResult, options: PulledImageOptions): Promise<ImageManifest> {
  const work = await mkdtemp(join(options.workParent, 'oci-'))
  try {
    const root = join(work, 'root')
    await applyLayers(pulled.layers.map((l) => ({ path: l.path, mediaType: l.mediaType, digest: l.digest })), root)
    const run = await mapImageConfig(pulled.config, root)
    const [program = '', ...args] = run.entrypoint
    return await options.builder.build({
      name: options.name,
      source: { kind: 'rootfs', dir: root, entrypoint: program, args, owners: 'keep' },
      format: options.format ?? 'auto',
      env: run.env,
      workdir: run.workingDir,
      ...(options.memoryMiB !== undefined ? { memoryMiB: options.memoryMiB } : {}),
      // The manifest's ports are what the gateway and health checks reach: TCP ones only.
      ports: run.ports.filter((p) => p.protocol === 'tcp').map((p) => ({ port: p.port, protocol: 'tcp' as const })),
      ...(run.user.uid !== 0 || run.user.gid !== 0 ? { user: run.user } : {}),
      ...(run.stopSignal !== 'SIGTERM' ? { stopSignal: run.stopSignal } : {}),
      ...(Object.keys(run.labels).length > 0 ? { labels: run.labels } : {}),
      overlaySizeMiB: options.overlaySizeMiB ?? DEFAULT_OVERLAY_MIB,
      origin: { reference: pulled.reference, manifestDigest: pulled.manifestDigest, layers: pulled.layers.map((l) => l.digest) }
    }, work)
  } finally {
    await rm(work, { recursive: true, force: true })
  }
}
