import { mkdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import type { Config } from '../../core/config.js'
import { UigniterError } from '../../core/errors.js'
import type { ImageManifest } from '../../core/image.js'
import type { ImageStore } from '../../guest/image-store.js'
import { chooseAccel, QEMU_BINARY, type AccelChoice } from './accel-probe.js'
import { buildQemuArgs } from './command-line.js'
import { ControlChannel } from './control-channel.js'
import { GuestProcess, type GuestExit } from './guest-process.js'
import { freePort } from '../../core/free-port.js'
import { type PortForward, USER_NETWORK } from '../../core/ports/vmm-driver.js'

export interface BootOptions {
  config: Config
  store: ImageStore
  manifest: ImageManifest
  /** guestPort → hostPort; a hostPort of 0 picks a free port. Bound to 127.0.0.1. */
  forwards?: Array<{ hostPort: number, guestPort: number }>
  vcpus?: number
  memoryMiB?: number
}

/**
 * One guest booted from an image with QEMU's user-mode network: what
 * `uigniter image test`, the tests and the boot benchmark use until the VM
 * lifecycle driver exists. It owns a run directory for its sockets.
 */
export class BootedImage {
  readonly guest: GuestProcess
  readonly forwards: PortForward[]
  readonly accel: AccelChoice
  readonly #controlSocket: string | undefined
  #control: ControlChannel | undefined

  private constructor (guest: GuestProcess, forwards: PortForward[], accel: AccelChoice, controlSocket: string | undefined) {
    this.guest = guest
    this.forwards = forwards
    this.accel = accel
    this.#controlSocket = controlSocket
  }

  static async start (options: BootOptions): Promise<BootedImage> {
    const { config, store, manifest } = options
    const kernelPath = store.blobPath(manifest.kernel.blob.digest)
    const accel = await chooseAccel(config, kernelPath, manifest.kernel.blob.digest)
    const runDir = join(config.dataDir, 'run', `boot-${process.pid}-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`)
    await mkdir(runDir, { recursive: true })
    const forwards: PortForward[] = []
    for (const f of options.forwards ?? []) {
      forwards.push({ hostAddress: '127.0.0.1', hostPort: f.hostPort === 0 ? await freePort() : f.hostPort, guestPort: f.guestPort })
    }
    const controlSocket = manifest.init !== null ? join(runDir, 'ctl.sock') : undefined
    const args = buildQemuArgs({
      manifest,
      kernelPath,
      rootfsPath: manifest.rootfs !== undefined ? store.blobPath(manifest.rootfs.digest) : undefined,
      accel: accel.accel,
      vcpus: options.vcpus ?? manifest.vcpus,
      memoryMiB: options.memoryMiB ?? manifest.memoryMiB,
      console: { kind: 'stdio' },
      controlSocket,
      network: { mode: 'user', forwards },
      guestNetwork: USER_NETWORK,
      hostname: manifest.name.split('/').pop()
    })
    const guest = new GuestProcess(QEMU_BINARY, args)
    const booted = new BootedImage(guest, forwards, accel, controlSocket)
    void guest.exited.finally(() => rm(runDir, { recursive: true, force: true })).catch(() => {})
    return booted
  }

  /** The control channel, connected on first use. */
  async control (): Promise<ControlChannel> {
    if (this.#controlSocket === undefined) {
      throw new UigniterError('UIG_ERR_CONTROL_CHANNEL', 'this image has no guest init, so it has no control channel')
    }
    this.#control ??= await ControlChannel.connect(this.#controlSocket)
    return this.#control
  }

  /**
   * Stops the guest: the init sends SIGTERM to the app and SIGKILL after
   * `graceMs`; QEMU is killed if it is still there `graceMs` + 5 s later.
   */
  async shutdown (graceMs = 5000): Promise<GuestExit> {
    const deadline = setTimeout(() => this.guest.kill(), graceMs + 5000)
    try {
      if (this.#controlSocket !== undefined) {
        try {
          const control = await this.control()
          await control.request('shutdown', { timeout_ms: graceMs })
        } catch {
          this.guest.kill()
        }
      } else {
        this.guest.kill()
      }
      return await this.guest.exited
    } finally {
      clearTimeout(deadline)
      this.#control?.close()
    }
  }

  /** Kills QEMU at once and waits for it. */
  async destroy (): Promise<GuestExit> {
    this.guest.kill()
    this.#control?.close()
    return await this.guest.exited
  }
}

