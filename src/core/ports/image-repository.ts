import type { ImageManifest } from '../image.js'

/**
 * The image repository port: manifests by reference and content-addressed
 * blobs. src/guest/image-store.ts implements it on the local disk.
 */
export interface ImageRepository {
  /** The manifest of `name[:tag]` or `sha256:…`; throws UIG_ERR_IMAGE_NOT_FOUND. */
  get: (ref: string) => Promise<ImageManifest>
  list: () => Promise<ImageManifest[]>
  /** Deletes the reference (and blobs no other image uses); returns what it pointed to. */
  remove: (ref: string) => Promise<ImageManifest>
  /** The host path of a blob, for the VMM to open. */
  blobPath: (digest: string) => string
}
