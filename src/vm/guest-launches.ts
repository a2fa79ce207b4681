import type { ImageManifest } from '../core/image.js'
import type { Publish, Share } from '../core/vm.js'
import type { HostNetworking } from '../core/ports/host-networking.js'
import type { ImageRepository } from '../core/ports/image-repository.js'
import { freePort } from '../core/free-port.js'
import { USER_NETWORK, type Accel, type GuestLaunch, type GuestNetwork, type GuestVolume, type LaunchNetwork } from '../core/ports/vmm-driver.js'

export type NetworkKind = 'bridge' | 'user' | 'none'

/** How a guest was attached: what its VM record shows. */
export interface Attachment { ipAddress: string | null, macAddress: string | null, tap: string | null }

export interface LaunchOptions {
  vcpus: number
  memoryMiB: number
  hostname: string
  network: NetworkKind
  publish?: Publish[]
  args?: string[]
  env?: Record<string, string>
  shares?: Share[]
  /** Checked by the volume manager already: see VolumeManager.checkAttach. */
  volumes?: GuestVolume[]
  overlaySizeMiB?: number
}

/**
 * Turns an image and a VM's settings into a QEMU launch, attaching the
 * guest to the network on the way: a tap and an address on the bridge,
 * free host ports for user-mode forwards, or nothing. VMs and templates
 * start the same way. `owner` keys the tap and the address; whoever
 * attaches detaches (HostNetwork.detach).
 */
export class GuestLaunches {
  readonly #images: ImageRepository
  readonly #accel: { accel: Accel }
  readonly #network: HostNetworking | undefined

  constructor (images: ImageRepository, accel: { accel: Accel }, network: HostNetworking | undefined) {
    this.#images = images
    this.#accel = accel
    this.#network = network
  }

  /** `bridge` when the host can make taps, else `user`: what a VM asking for a bridge gets. */
  networkFor (asked: NetworkKind): NetworkKind {
    return asked === 'bridge' && this.#network === undefined ? 'user' : asked
  }

  async prepare (owner: string, manifest: ImageManifest, options: LaunchOptions): Promise<{ launch: GuestLaunch, attachment: Attachment }> {
    const base = {
      manifest,
      kernelPath: this.#images.blobPath(manifest.kernel.blob.digest),
      rootfsPath: manifest.rootfs !== undefined ? this.#images.blobPath(manifest.rootfs.digest) : undefined,
      accel: this.#accel.accel,
      vcpus: options.vcpus,
      memoryMiB: options.memoryMiB,
      hostname: options.hostname,
      appArgs: options.args,
      appEnv: options.env,
      shares: options.shares ?? [],
      ...(options.volumes !== undefined && options.volumes.length > 0 ? { volumes: options.volumes } : {}),
      ...(options.overlaySizeMiB !== undefined ? { overlaySizeMiB: options.overlaySizeMiB } : {})
    }
    // Any booted guest may ask DHCP for its address (a unikernel, or an app of ours that runs a DHCP client).
    const { network, guestNetwork, attachment } = await this.attach(owner, options.network, options.publish ?? [], { dhcp: true })
    return { launch: { ...base, network, ...(guestNetwork !== undefined ? { guestNetwork } : {}) }, attachment }
  }

  /**
   * Only the network: what a clone needs, whose guest is already made.
   * `bridge` becomes `user` on a host without taps.
   */
  async attach (owner: string, asked: NetworkKind, publish: Publish[], options: { dhcp: boolean } = { dhcp: true }): Promise<{ network: LaunchNetwork, guestNetwork?: GuestNetwork, attachment: Attachment }> {
    const kind = this.networkFor(asked)
    if (kind === 'bridge' && this.#network !== undefined) {
      const attached = await this.#network.attach(owner, options)
      return {
        network: { mode: 'tap', tap: attached.tap, mac: attached.mac },
        guestNetwork: { address: attached.ip, prefix: attached.prefix, gateway: attached.gateway, dns: attached.dns },
        attachment: { ipAddress: attached.ip, macAddress: attached.mac, tap: attached.tap }
      }
    }
    if (kind === 'user') {
      return {
        network: { mode: 'user', forwards: await userForwards(publish) },
        guestNetwork: USER_NETWORK,
        attachment: { ipAddress: USER_NETWORK.address, macAddress: null, tap: null }
      }
    }
    return { network: { mode: 'none' }, attachment: { ipAddress: null, macAddress: null, tap: null } }
  }

  /**
   * Frees the owner's tap, published ports and, unless `keepAddress`, its
   * address; a no-op without a bridge.
   */
  async release (owner: string, options: { keepAddress?: boolean } = {}): Promise<void> {
    await this.#network?.detach(owner, { releaseIp: options.keepAddress !== true })
  }
}

/** Host port 0 means any free port. */
export async function userForwards (publish: Publish[]): Promise<Array<{ hostAddress: string, hostPort: number, guestPort: number }>> {
  const forwards = []
  for (const p of publish) forwards.push({ hostAddress: p.hostAddress, hostPort: p.hostPort === 0 ? await freePort() : p.hostPort, guestPort: p.guestPort })
  return forwards
}
