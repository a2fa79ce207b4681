import { ociError } from './oci-errors.js'

/** The manifest media types a registry may answer with, both families. */
export const mediaTypes = {
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociConfig: 'application/vnd.oci.image.config.v1+json',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerConfig: 'application/vnd.docker.container.image.v1+json'
} as const

/** What we send as Accept: an index or list first, so that we pick the platform ourselves. */
export const manifestAccept = [
  mediaTypes.ociIndex, mediaTypes.dockerManifestList, mediaTypes.ociManifest, mediaTypes.dockerManifest
].join(', ')

export type LayerCompression = 'gzip' | 'zstd' | 'none'

const layerTypes: Record<string, LayerCompression> = {
  'application/vnd.oci.image.layer.v1.tar': 'none',
  'application/vnd.oci.image.layer.v1.tar+gzip': 'gzip',
  'application/vnd.oci.image.layer.v1.tar+zstd': 'zstd',
  'application/vnd.docker.image.rootfs.diff.tar.gzip': 'gzip',
  // Docker's "foreign" layers (Windows base images) are the same bytes under another name.
  'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip': 'gzip',
  'application/vnd.oci.image.layer.nondistributable.v1.tar': 'none',
  'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip': 'gzip',
  'application/vnd.oci.image.layer.nondistributable.v1.tar+zstd': 'zstd'
}

/** The compression a layer media type names, or undefined when it is not a layer type uigniter reads. */
export function knownLayerCompression (mediaType: string): LayerCompression | undefined {
  return layerTypes[mediaType]
}

export function isIndexType (mediaType: string): boolean {
  return mediaType === mediaTypes.ociIndex || mediaType === mediaTypes.dockerManifestList
}

export function isManifestType (mediaType: string): boolean {
  return mediaType === mediaTypes.ociManifest || mediaType === mediaTypes.dockerManifest
}

export function isConfigType (mediaType: string): boolean {
  return mediaType === mediaTypes.ociConfig || mediaType === mediaTypes.dockerConfig
}

/**
 * How a layer's bytes are compressed, from its media type. Anything else
 * (a Helm chart, a signature, a wasm module) is refused here rather than
 * misread as a tar later.
 */
export function layerCompression (mediaType: string): LayerCompression {
  const compression = knownLayerCompression(mediaType)
  if (compression === undefined) {
    throw ociError('manifest-unsupported', `layer media type ${JSON.stringify(mediaType)} is not a container filesystem layer uigniter can apply (tar, tar+gzip or tar+zstd)`)
  }
  return compression
}
