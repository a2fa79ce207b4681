import type { ImageManifest } from '../image.js'
import type { VmExit } from '../vm.js'

/**
 * The VMM driver port: what the VM lifecycle, templates and pools ask of a
 * hypervisor. The QEMU adapter (src/vmm/qemu/) implements it; a Firecracker
 * driver would too: every type here names guest-level things (a tap, a RAM
 * file, a saved device state, a control socket), none of QEMU's options.
 */

export type Accel = 'kvm' | 'tcg'

export interface PortForward {
  hostAddress: string
  hostPort: number
  guestPort: number
  /** The guest address to forward to; the user-mode network's default (10.0.2.15) when absent. A clone takes its own. */
  guestAddress?: string
}

/**
 * Guest RAM in a file instead of anonymous memory, for templates and clones
 * (design.md fact 5): a template maps it shared, so that its RAM lands in
 * the file; a clone maps the same file private, so that it reads the
 * template's pages and copies only those it writes.
 */
export interface MemoryBackend { path: string, share: boolean }

/** The guest's own address plan, told to the guest init. */
export interface GuestNetwork { address: string, prefix: number, gateway?: string, dns?: string[] }

/** A host directory shared into the guest (9p). */
export interface GuestShare { hostPath: string, guestPath: string, readOnly: boolean }

/**
 * A persistent volume's block device (a raw file holding ext4) attached to
 * the guest; the init mounts it at guestPath. QEMU writes it back on the
 * guest's flushes, so what an app fsyncs is on the host's disk.
 */
export interface GuestVolume { hostPath: string, guestPath: string, readOnly: boolean }

/** How the guest's eth0 reaches the world: not at all, the VMM's user-mode stack, or a host tap. */
export type LaunchNetwork =
  | { mode: 'none' }
  | { mode: 'user', forwards: PortForward[], mac?: string }
  | { mode: 'tap', tap: string, mac: string }

/** The address plan of the user-mode network (QEMU's slirp). */
export const USER_NETWORK: GuestNetwork = { address: '10.0.2.15', prefix: 24, gateway: '10.0.2.2', dns: ['10.0.2.3'] }

/** One guest to launch; files are host paths. */
export interface GuestLaunch {
  manifest: ImageManifest
  kernelPath: string
  rootfsPath?: string
  accel: Accel
  vcpus: number
  memoryMiB: number
  network: LaunchNetwork
  /** Told to the guest init on the kernel command line. */
  guestNetwork?: GuestNetwork
  hostname?: string
  /** Replaces the image's app arguments (argv[1..]) when given, even when empty. */
  appArgs?: string[]
  /** Added to the image's environment, replacing variables of the same name. */
  appEnv?: Record<string, string>
  shares?: GuestShare[]
  volumes?: GuestVolume[]
  /** A writable ext4 overlay over the read-only root, created in the state directory and deleted with it. */
  overlaySizeMiB?: number
  /** Start with the vCPUs stopped: a prespawned pool instance, booted by `resume` when claimed. */
  startPaused?: boolean
  /** Extra kernel parameters for our own guests (the accel probe and the pools use it). */
  extraCmdline?: string[]
  /** Guest RAM backed by this file (templates and clones) rather than anonymous memory. */
  memory?: MemoryBackend
  /** `defer`: the guest waits for `restore` (a clone restoring its template's saved state). */
  incoming?: 'defer'
}

export interface SpawnOptions {
  /** The VM's id: the key of its state directory and its name in host tools. */
  id: string
  /** Where the driver keeps the VM's files (pidfile, sockets, console log). */
  stateDir: string
  launch: GuestLaunch
  /** Host CPUs for every thread of the VMM; unpinned when absent. */
  cpuAffinity?: number[]
  /** A saved device state (GuestVm.saveState) for `launch.incoming: 'defer'`, restored by GuestVm.restoreState. */
  incomingState?: string
}

/** The guest init's machine-readable console lines (src/guest/init/uigniter-init.c). */
export type ConsoleMarker =
  | { kind: 'init' }
  | { kind: 'app-started', pid: number }
  | { kind: 'exec-failed', errno: number, error: string }
  | { kind: 'exit', code?: number, signal?: number }
  | { kind: 'probe-ok' }
  | { kind: 'init-failed', error: string }

/** What a driver can do, so that callers refuse early instead of failing half-way. */
export interface DriverCapabilities {
  /** Templates and copy-on-write clones (saveState / restoreState over a shared RAM file). */
  clone: boolean
  /** Pause and resume of the vCPUs (prespawned pools). */
  pause: boolean
  /** Each VMM process runs jailed (own uid, chroot, seccomp, cgroup). */
  jailed: boolean
}

/**
 * One running guest, spawned by this process or adopted after a restart.
 * `exited` settles once, with how the VM ended. Events: 'marker'
 * (ConsoleMarker, as the init prints them).
 */
export interface GuestVm {
  readonly id: string
  readonly pid: number
  readonly stateDir: string
  readonly exited: Promise<VmExit>
  /** The unix socket of the host↔guest control channel (the guest init's protocol); undefined for a guest without our init. */
  readonly controlSocket: string | undefined
  /** Graceful: the init stops the app (SIGTERM, then SIGKILL after `graceMs`), then harsher steps. Idempotent. */
  stop: (options?: { graceMs?: number }) => Promise<VmExit>
  /** Ends the VMM at once; idempotent. */
  kill: () => void
  pause: () => Promise<void>
  resume: () => Promise<void>
  /**
   * Pauses the guest and saves its device state to `statePath`, its RAM left
   * in the shared memory file (templates). The VM stays paused.
   */
  saveState: (statePath: string, timeoutMs: number) => Promise<void>
  /** For a VM spawned with `incomingState`: restores that state and runs the guest. */
  restoreState: (timeoutMs: number) => Promise<void>
  /** Resolves when the init prints a marker of that kind (at once if it did); rejects on exit or deadline. */
  waitForMarker: (kind: ConsoleMarker['kind'], timeoutMs: number) => Promise<ConsoleMarker>
  readConsole: (options?: { tailBytes?: number }) => Promise<string>
  followConsole: (onData: (text: string) => void, options?: { tailBytes?: number, onEnd?: () => void }) => () => void
  /** Stops watching the guest without stopping it: it outlives this process. */
  close: () => void
  on: (event: 'marker', listener: (marker: ConsoleMarker) => void) => unknown
  off: (event: 'marker', listener: (marker: ConsoleMarker) => void) => unknown
}

/** Generic over the adapter's VM class, so that an adapter's own callers keep its extra methods. */
export interface VmmDriver<V extends GuestVm = GuestVm> {
  readonly capabilities: DriverCapabilities
  /**
   * Validates the launch against the host, prepares the state directory and
   * starts the guest detached (it outlives the daemon). Resolves once the VMM
   * runs, not when the app is up.
   */
  spawn: (options: SpawnOptions) => Promise<V>
  /** Finds a guest again from its state directory; one that ended meanwhile comes back as `{ dead, exit }`. */
  adopt: (stateDir: string) => Promise<V | { dead: true, exit: VmExit }>
  readConsole: (stateDir: string, options?: { tailBytes?: number }) => Promise<string>
  followConsole: (stateDir: string, onData: (text: string) => void, options?: { tailBytes?: number, onEnd?: () => void }) => () => void
  /** The launch a VM was spawned with, as its state directory records it. */
  launchOf: (stateDir: string) => Promise<GuestLaunch>
  /** Deletes a VM's state directory; refuses while its VMM runs. */
  remove: (stateDir: string) => Promise<void>
}
