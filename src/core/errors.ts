/**
 * The one table of uigniter's errors. Every error has a stable code
 * (`UIG_ERR_<AREA>_<WHAT>`) that callers and scripts match on, a message a
 * person can act on, and the HTTP status the API answers with.
 * docs/errors.md lists every code; a test fails when one is missing there.
 */

export const errorCodes = {
  UIG_ERR_CONFIG_INVALID: { statusCode: 400, title: 'The configuration file or an option is invalid' },
  UIG_ERR_CLI_USAGE: { statusCode: 400, title: 'A command-line flag or argument is missing or malformed' },
  UIG_ERR_HOST_MISSING_TOOL: { statusCode: 500, title: 'A host program or package that uigniter needs is not installed' },
  UIG_ERR_HOST_NOT_ROOT: { statusCode: 500, title: 'Bridge networking needs root (CAP_NET_ADMIN) on the host' },
  UIG_ERR_NO_SPACE: { statusCode: 507, title: 'No space left on the device that holds the data or cache directory' },
  UIG_ERR_KERNEL_BUILD_FAILED: { statusCode: 500, title: 'The guest kernel build failed' },
  UIG_ERR_KERNEL_CONFIG_MISMATCH: { statusCode: 500, title: 'Kconfig dropped an option the config fragment asks for' },
  UIG_ERR_KERNEL_NOT_BUILT: { statusCode: 409, title: 'The guest kernel is not in the cache yet' },
  UIG_ERR_KERNEL_NOT_BOOTABLE: { statusCode: 400, title: 'The kernel file cannot be booted by QEMU' },
  UIG_ERR_KERNEL_MODULE_MISSING: { statusCode: 500, title: 'The packaged guest kernel lacks a driver the guest needs, as a module or built in' },
  UIG_ERR_INIT_NOT_BUILT: { statusCode: 409, title: 'The guest init binary has not been built' },
  UIG_ERR_IMAGE_INVALID_NAME: { statusCode: 400, title: 'An image name or tag is not valid' },
  UIG_ERR_IMAGE_PATH_NOT_FOUND: { statusCode: 400, title: 'A path given to the image builder does not exist' },
  UIG_ERR_IMAGE_PATH_UNREADABLE: { statusCode: 400, title: 'A path given to the image builder cannot be read' },
  UIG_ERR_IMAGE_NOT_ELF: { statusCode: 400, title: 'The file is not an ELF executable' },
  UIG_ERR_IMAGE_UNSUPPORTED_ELF: { statusCode: 400, title: 'The ELF file is not an x86-64 executable' },
  UIG_ERR_IMAGE_LIBRARY_NOT_FOUND: { statusCode: 400, title: 'A shared library the executable needs cannot be found' },
  UIG_ERR_IMAGE_NO_ENTRYPOINT: { statusCode: 400, title: 'The entrypoint is missing from the source directory' },
  UIG_ERR_IMAGE_SPEC_INVALID: { statusCode: 400, title: 'The image build spec is invalid' },
  UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER: { statusCode: 400, title: 'A unikernel\'s command line has an unknown placeholder or a lone brace' },
  UIG_ERR_IMAGE_TOO_LARGE: { statusCode: 400, title: 'The image is too large for the chosen format' },
  UIG_ERR_IMAGE_KERNEL_MISMATCH: { statusCode: 400, title: 'The image format or machine asked for cannot boot with the configured guest kernel' },
  UIG_ERR_IMAGE_NOT_FOUND: { statusCode: 404, title: 'No image has that name and tag' },
  UIG_ERR_IMAGE_STORE_CORRUPT: { statusCode: 500, title: 'A manifest or blob in the image store is damaged' },
  UIG_ERR_VM_BOOT_FAILED: { statusCode: 500, title: 'The VM did not boot' },
  UIG_ERR_VM_APP_NOT_STARTED: { statusCode: 500, title: 'The guest booted but the app could not be started' },
  UIG_ERR_VM_TIMEOUT: { statusCode: 504, title: 'The VM did not reach the expected state in time' },
  UIG_ERR_STORE: { statusCode: 500, title: 'The state database cannot be used' },
  UIG_ERR_VM_NOT_FOUND: { statusCode: 404, title: 'No VM has that id or name' },
  UIG_ERR_VM_NAME_IN_USE: { statusCode: 409, title: 'A VM with that name already exists' },
  UIG_ERR_VM_INVALID_STATE: { statusCode: 409, title: 'The VM is not in a state that allows this operation' },
  UIG_ERR_API_VALIDATION: { statusCode: 400, title: 'The request body, path or query is invalid' },
  UIG_ERR_API_UNAUTHORIZED: { statusCode: 401, title: 'The request lacks the bearer token this daemon requires' },
  UIG_ERR_API_NOT_FOUND: { statusCode: 404, title: 'No such API route' },
  UIG_ERR_DAEMON_UNREACHABLE: { statusCode: 503, title: 'The CLI cannot reach the daemon and could not start one' },
  UIG_ERR_INTERNAL: { statusCode: 500, title: 'An unexpected error; the daemon log has the details' },
  UIG_ERR_NET_INVALID_SUBNET: { statusCode: 400, title: 'The configured subnet is not a private IPv4 /16../29 network' },
  UIG_ERR_NET_SUBNET_CONFLICT: { statusCode: 409, title: 'The configured subnet overlaps an address of another host interface' },
  UIG_ERR_NET_BRIDGE_CONFLICT: { statusCode: 409, title: 'A device with the bridge\'s name exists with another type or address' },
  UIG_ERR_NET_POOL_EXHAUSTED: { statusCode: 503, title: 'Every address of the subnet is allocated' },
  UIG_ERR_NET_PORT_IN_USE: { statusCode: 409, title: 'The host port is already published or in use on the host' },
  UIG_ERR_NET_PUBLISH_INVALID: { statusCode: 400, title: 'A port publication names an address or port that cannot be used' },
  UIG_ERR_NET_NOT_ATTACHED: { statusCode: 409, title: 'The VM has no address on the bridge network' },
  UIG_ERR_NET_SETUP_FAILED: { statusCode: 500, title: 'A host network command (ip, nft) failed' },
  UIG_ERR_NET_DHCP_FAILED: { statusCode: 500, title: 'The DHCP server on the bridge (dnsmasq) could not start or died' },
  UIG_ERR_VM_RESOURCES: { statusCode: 400, title: 'The VM asks for more vCPUs, memory or host CPUs than the host has' },
  UIG_ERR_VM_CMDLINE_INVALID: { statusCode: 400, title: 'The guest kernel command line would exceed 2048 bytes, or an argument holds a NUL byte' },
  UIG_ERR_VM_SHARE_INVALID: { statusCode: 400, title: 'A directory to share into the VM is missing, or its guest path cannot be used' },
  UIG_ERR_VOLUME_NOT_FOUND: { statusCode: 404, title: 'No volume has that name' },
  UIG_ERR_VOLUME_EXISTS: { statusCode: 409, title: 'A volume with that name exists already' },
  UIG_ERR_VOLUME_IN_USE: { statusCode: 409, title: 'The volume is attached to a live VM: it cannot be deleted, or attached read-write again' },
  UIG_ERR_VOLUME_INVALID: { statusCode: 400, title: 'A volume request or attachment is invalid (guest path, duplicate, read-only rules)' },
  UIG_ERR_VOLUME_CREATE_FAILED: { statusCode: 500, title: 'The volume\'s file or filesystem could not be made' },
  UIG_ERR_VOLUME_TEMPLATE: { statusCode: 409, title: 'A VM with volumes attached cannot be made a template: its clones would share the disk' },
  UIG_ERR_VM_STATE_DIR: { statusCode: 500, title: 'A VM\'s state directory is missing, damaged, or its paths are too long' },
  UIG_ERR_JAIL_SETUP: { statusCode: 500, title: 'A VM\'s jail (its uid, chroot or cgroup) cannot be set up' },
  UIG_ERR_QMP: { statusCode: 502, title: 'QEMU\'s monitor (QMP) failed or refused a command' },
  UIG_ERR_POOL_NOT_FOUND: { statusCode: 404, title: 'No pool has that name' },
  UIG_ERR_POOL_NAME_IN_USE: { statusCode: 409, title: 'A pool with that name already exists' },
  UIG_ERR_POOL_EMPTY: { statusCode: 503, title: 'The pool has no ready instance and its policy is reject' },
  UIG_ERR_POOL_TIMEOUT: { statusCode: 503, title: 'No pool instance became ready within the queue timeout' },
  UIG_ERR_POOL_CLOSED: { statusCode: 409, title: 'The pool is being deleted' },
  UIG_ERR_POOL_NOT_CLAIMED: { statusCode: 409, title: 'The instance was not claimed from this pool' },
  UIG_ERR_POOL_POLICY_INVALID: { statusCode: 400, title: 'A pool policy is invalid' },
  UIG_ERR_CONTROL_CHANNEL: { statusCode: 502, title: 'The guest control channel failed or answered badly' },
  UIG_ERR_TEMPLATE_FAILED: { statusCode: 500, title: 'A template could not be made from the image' },
  UIG_ERR_TEMPLATE_NOT_FOUND: { statusCode: 404, title: 'No usable template has that id' },
  UIG_ERR_TEMPLATE_IN_USE: { statusCode: 409, title: 'Live clones or a clone pool still use the template' },
  UIG_ERR_TEMPLATE_NAME_IN_USE: { statusCode: 409, title: 'A template with that name exists or is being made' },
  UIG_ERR_TEMPLATE_INVALID: { statusCode: 400, title: 'The template request is invalid' },
  UIG_ERR_CLONE_REQUEST: { statusCode: 400, title: 'The VM request asks for something a clone of its template cannot have' },
  UIG_ERR_CLONE_RESTORE: { statusCode: 500, title: 'A clone could not restore its template\'s state' },
  UIG_ERR_CLONE_IDENTITY: { statusCode: 502, title: 'A clone did not take its own identity in time; it was destroyed' },
  UIG_ERR_CLONE_HOOK_FAILED: { statusCode: 502, title: 'A clone\'s app did not answer its after-clone hook in time, or refused it; the clone was destroyed' },
  UIG_ERR_SERVICE_SPEC_INVALID: { statusCode: 400, title: 'A service spec or application file is invalid' },
  UIG_ERR_SERVICE_NOT_FOUND: { statusCode: 404, title: 'No service has that name' },
  UIG_ERR_SERVICE_CONFLICT: { statusCode: 409, title: 'The service name or gateway port belongs to another application' },
  UIG_ERR_GATEWAY_PORT_IN_USE: { statusCode: 409, title: 'The gateway cannot listen on a service\'s TCP port' },
  UIG_ERR_GATEWAY_NO_SERVICE: { statusCode: 404, title: 'The gateway knows no service by the request\'s Host or /svc/NAME/ prefix' },
  UIG_ERR_GATEWAY_NO_ENDPOINT: { statusCode: 503, title: 'The service has no healthy endpoint, and none became ready while the request was held' },
  UIG_ERR_GATEWAY_HOLD_LIMIT: { statusCode: 503, title: 'The service is starting and the gateway already holds as many requests as its hold limit allows' },
  UIG_ERR_GATEWAY_UPGRADE_UNSUPPORTED: { statusCode: 501, title: 'The gateway does not proxy protocol upgrades (WebSocket) on its HTTP port' },
  UIG_ERR_GATEWAY_UPSTREAM: { statusCode: 502, title: 'The endpoint failed before it answered, and the request could not be retried elsewhere' },
  UIG_ERR_GATEWAY_UPSTREAM_MALFORMED: { statusCode: 502, title: 'The endpoint answered with a malformed HTTP response, which the gateway does not forward' },
  UIG_ERR_CLUSTER_UNAVAILABLE: { statusCode: 503, title: 'The cluster store (etcd) cannot be reached, so the change was not made' },
  UIG_ERR_CLUSTER_NOT_ENABLED: { statusCode: 409, title: 'This daemon runs a single host, not a cluster node' },
  UIG_ERR_CLUSTER_UNSCHEDULABLE: { statusCode: 503, title: 'No node can take the replica or VM: every node was filtered out' },
  UIG_ERR_CLUSTER_NO_LEADER: { statusCode: 503, title: 'The cluster has no leader yet, so the change cannot be made' },
  UIG_ERR_CLUSTER_SUBNET_EXHAUSTED: { statusCode: 503, title: 'Every node subnet of the cluster range is taken' },
  UIG_ERR_NODE_NOT_FOUND: { statusCode: 404, title: 'No node has that name' },
  UIG_ERR_NODE_UNREACHABLE: { statusCode: 502, title: 'A peer node\'s API did not answer' },
  UIG_ERR_IMAGE_FETCH_FAILED: { statusCode: 502, title: 'An image could not be fetched from a peer node' },
  UIG_ERR_IMAGE_DIGEST_MISMATCH: { statusCode: 502, title: 'A fetched image manifest or blob does not match its digest; it was discarded' },
  UIG_ERR_OCI_REFERENCE_INVALID: { statusCode: 400, title: 'An image reference is not [registry/]name[:tag|@sha256:digest]' },
  UIG_ERR_OCI_AUTH: { statusCode: 401, title: 'The registry refused the pull: no credentials, or wrong ones' },
  UIG_ERR_OCI_NOT_FOUND: { statusCode: 404, title: 'The registry has no such repository, tag, manifest or blob' },
  UIG_ERR_OCI_MANIFEST_UNSUPPORTED: { statusCode: 400, title: 'The image\'s manifest, media type or platform is one uigniter does not take' },
  UIG_ERR_OCI_REGISTRY: { statusCode: 502, title: 'The registry failed or answered badly' },
  UIG_ERR_OCI_LAYER_UNSAFE: { statusCode: 400, title: 'An image layer has an entry that escapes the root (.., an absolute path, a write through a symlink, a hard link outside)' },
  UIG_ERR_OCI_LAYER_INVALID: { statusCode: 400, title: 'An image layer is not a valid tar (or its compression is broken)' },
  UIG_ERR_OCI_LAYER_TOO_LARGE: { statusCode: 400, title: 'An image layer has an entry, or all its layers a total, past the limits' },
  UIG_ERR_OCI_CONFIG_INVALID: { statusCode: 400, title: 'An image\'s config (entrypoint, user, env, ports, stop signal) cannot be used' }
} as const satisfies Record<string, { statusCode: number; title: string }>

export type ErrorCode = keyof typeof errorCodes

export class UigniterError extends Error {
  readonly code: ErrorCode
  readonly statusCode: number

  constructor (code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'UigniterError'
    this.code = code
    this.statusCode = errorCodes[code].statusCode
  }

  toJSON (): { code: ErrorCode; message: string; statusCode: number } {
    return { code: this.code, message: this.message, statusCode: this.statusCode }
  }
}

/** True when a Node.js system error (from fs, child_process) carries this errno code. */
export function hasErrno (err: unknown, ...codes: string[]): boolean {
  return typeof err === 'object' && err !== null && 'code' in err &&
    codes.includes(String((err).code))
}

/**
 * Turns ENOSPC/EDQUOT into UIG_ERR_NO_SPACE so that every writer reports a full
 * disk the same way; anything else is rethrown unchanged.
 */
export function rethrowNoSpace (err: unknown, where: string): never {
  if (hasErrno(err, 'ENOSPC', 'EDQUOT')) {
    throw new UigniterError('UIG_ERR_NO_SPACE', `no space left on the device holding ${where}; free some space and try again`, { cause: err })
  }
  throw err
}
