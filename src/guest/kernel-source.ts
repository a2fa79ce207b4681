import type { ImageManifest } from '../core/image.js'

/** A kernel module the guest init loads before the app: a file on the host, and where the image holds it. */
export interface GuestModule {
  hostPath: string
  /** Absolute path inside the image, e.g. /lib/modules/6.1.0-56-cloud-amd64/kernel/drivers/net/virtio_net.ko. */
  guestPath: string
}

/** What the image builder needs of a guest kernel, whichever source it comes from. */
export interface GuestKernel {
  source: 'build' | 'debian-cloud'
  /** Changes whenever the kernel file or its modules would; recorded in the manifest. */
  key: string
  version: string
  /** The file QEMU boots (`-kernel`). */
  path: string
  size: number
  /** Modules to load, in load order (dependencies first); empty when everything is built in. */
  modules: GuestModule[]
  /** Machines (with their virtio transport) that boot this kernel with our command line; the first is the default. */
  machines: Array<ImageManifest['machine']>
  /**
   * RAM this kernel needs beyond our own kernel's footprint. The builder adds
   * it to the image's memoryMiB, so a spec written for our kernel boots
   * unchanged with another one.
   */
  extraMemoryMiB: number
}

/**
 * Where guest kernels come from: built by us, or Debian's packaged one. Its
 * own file, apart from the factory in guest-kernel.ts, so that the sources
 * implement it without importing the factory that imports them.
 */
export interface KernelSource {
  readonly kind: GuestKernel['source']
  /** The ready kernel; our own one throws UIG_ERR_KERNEL_NOT_BUILT until `uigniter kernel build` has run. */
  get: () => Promise<GuestKernel>
  /** The ready kernel, or undefined when it still has to be built or prepared. */
  find: () => Promise<GuestKernel | undefined>
  /** Builds or prepares the kernel unless it is ready (or `force`). */
  build: (options?: { force?: boolean, onLog?: (line: string) => void }) => Promise<GuestKernel>
}
