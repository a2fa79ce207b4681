import { ociError } from './oci-errors.js'

/** A parsed `[registry/]name[:tag][@sha256:hex]`, with Docker Hub's defaults filled in. */
export interface OciReference {
  /** As the user would write it: `docker.io`, `localhost:5000`, `ghcr.io`. */
  registry: string
  /** The repository path, `library/busybox` for Docker Hub's official images. */
  repository: string
  tag: string | undefined
  digest: string | undefined
}

export const dockerHub = 'docker.io'
/** Docker Hub's API does not answer on docker.io itself. */
const dockerHubApiHost = 'registry-1.docker.io'

const componentRe = /^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$/
const tagRe = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/
const digestRe = /^sha256:[a-f0-9]{64}$/
// A host name or IPv4 address, an optional port; IPv6 in brackets.
const registryRe = /^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$/
const maxNameLength = 255

function invalid (input: string, why: string): never {
  throw ociError('reference-invalid', `image reference ${JSON.stringify(input)} is not valid: ${why}; write [registry/]name[:tag|@sha256:digest], e.g. docker.io/library/busybox:1.36`)
}

/**
 * Parses an image reference the way docker does: the first path component is
 * a registry only when it has a dot or a port or is `localhost`; otherwise the
 * image is on Docker Hub, under `library/` when it has a single component.
 * Without a tag or a digest, the tag is `latest`.
 * @example
 * parseReference('busybox') // { registry: 'docker.io', repository: 'library/busybox', tag: 'latest', digest: undefined }
 * parseReference('127.0.0.1:5000/test/app@sha256:...')
 */
export function parseReference (input: string): OciReference {
  if (input.length === 0) invalid(input, 'it is empty')
  if (input.length > 4096 || /\s/.test(input)) invalid(input, 'it holds white space or is too long')
  let rest = input
  let digest: string | undefined
  const at = rest.indexOf('@')
  if (at >= 0) {
    digest = rest.slice(at + 1)
    rest = rest.slice(0, at)
    if (!digestRe.test(digest)) invalid(input, 'the digest must be sha256: and 64 lower-case hex digits')
  }
  let tag: string | undefined
  const lastSlash = rest.lastIndexOf('/')
  const colon = rest.lastIndexOf(':')
  if (colon > lastSlash) {
    tag = rest.slice(colon + 1)
    rest = rest.slice(0, colon)
    if (!tagRe.test(tag)) invalid(input, 'a tag is up to 128 letters, digits, _ . and -, not starting with . or -')
  }
  let registry = dockerHub
  const parts = rest.split('/')
  const first = parts[0] ?? ''
  if (parts.length > 1 && (first.includes('.') || first.includes(':') || first === 'localhost' || first.startsWith('['))) {
    registry = first
    parts.shift()
    if (!registryRe.test(registry)) invalid(input, `${JSON.stringify(registry)} is not a host[:port]`)
  }
  if (registry === 'index.docker.io' || registry === dockerHubApiHost) registry = dockerHub
  if (registry === dockerHub && parts.length === 1) parts.unshift('library')
  for (const part of parts) {
    if (!componentRe.test(part)) invalid(input, `the name component ${JSON.stringify(part)} must be lower-case letters and digits, separated by . _ __ or -`)
  }
  const repository = parts.join('/')
  if (repository.length > maxNameLength) invalid(input, `the name is longer than ${maxNameLength} characters`)
  if (tag === undefined && digest === undefined) tag = 'latest'
  return { registry, repository, tag, digest }
}

/** The reference written out in full: `docker.io/library/busybox:latest`, `host/name@sha256:...`. */
export function formatReference (ref: OciReference): string {
  return `${ref.registry}/${ref.repository}${ref.tag !== undefined ? `:${ref.tag}` : ''}${ref.digest !== undefined ? `@${ref.digest}` : ''}`
}

/** The host[:port] that serves the registry's API (Docker Hub's differs from its name). */
export function registryApiHost (registry: string): string {
  return registry === dockerHub ? dockerHubApiHost : registry
}

/** What the manifest is asked for by: the digest when there is one (it pins the content), else the tag. */
export function manifestReference (ref: OciReference): string {
  return ref.digest ?? ref.tag ?? 'latest'
}

export function isDigest (value: string): boolean {
  return digestRe.test(value)
}
