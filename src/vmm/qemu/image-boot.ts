import { EventEmitter } from 'node:events'
import { join } from 'node:path'
import type { Config } from '../../core/config.js'
import { UigniterError } from '../../core/errors.js'
import { freePort } from '../../core/free-port.js'
import type { ImageManifest } from '../../core/image.js'
import type { ImageRepository } from '../../core/ports/image-repository.js'
import { USER_NETWORK, type ConsoleMarker, type PortForward } from '../../core/ports/vmm-driver.js'
import type { VmExit } from '../../core/vm.js'
import { chooseAccel, type AccelChoice } from './accel-probe.js'
import { parseConsoleMarker } from './console-markers.js'
import { ControlChannel } from './control-channel.js'
import { QemuDriver } from './qemu-driver.js'
import type { QemuVm } from './qemu-vm.js'

export interface BootOptions {
  config: Config
  store: ImageRepository
  manifest: ImageManifest
  /** guestPort → hostPort; a hostPort of 0 picks a free port. Bound to 127.0.0.1. */
  forwards?: Array<{ hostPort: number, guestPort: number }>
  vcpus?: number
  memoryMiB?: number
}

/** When each stage was reached, in performance.now() milliseconds (for `image test` and the boot benchmarks). */
export interface BootTimings {
  spawnedAt: number
  initAt?: number
  appStartedAt?: number
  firstOutputAt?: number
  exitedAt?: number
}

/**
 * One guest booted from an image with the user-mode network, outside the
 * daemon: what `uigniter image test`, the tests and the boot benchmarks use.
 * It is a VM of the same QemuDriver the daemon uses (one runner, one exit
 * vocabulary), in a state directory of its own that goes with it. Events:
 * 'line' (every console line that is not an init marker).
 */
export class BootedImage extends EventEmitter {
  readonly vm: QemuVm
  readonly forwards: PortForward[]
  readonly accel: AccelChoice
  readonly timings: BootTimings
  readonly exited: Promise<VmExit>
  #control: ControlChannel | undefined

  private constructor (vm: QemuVm, forwards: PortForward[], accel: AccelChoice, timings: BootTimings, driver: QemuDriver) {
    super()
    this.vm = vm
    this.forwards = forwards
    this.accel = accel
    this.timings = timings
    let partial = ''
    let appStarted = false
    const onLine = (line: string): void => {
      const marker = parseConsoleMarker(line)
      const now = performance.now()
      if (marker === undefined) {
        if (appStarted && timings.firstOutputAt === undefined && line.trim() !== '') timings.firstOutputAt = now
        this.emit('line', line)
        return
      }
      if (marker.kind === 'init') timings.initAt ??= now
      if (marker.kind === 'app-started') { timings.appStartedAt ??= now; appStarted = true }
    }
    const unfollow = vm.followConsole((text) => {
      const lines = (partial + text).split('\n')
      partial = lines.pop() ?? ''
      for (const line of lines) onLine(line.replace(/\r$/, ''))
    }, { tailBytes: Infinity })
    this.exited = vm.exited.then(async (exit) => {
      timings.exitedAt = performance.now()
      unfollow()
      if (partial !== '') onLine(partial)
      this.#control?.close()
      await driver.remove(vm.stateDir).catch(() => {})
      return exit
    })
  }

  static async start (options: BootOptions): Promise<BootedImage> {
    const { config, store, manifest } = options
    const kernelPath = store.blobPath(manifest.kernel.blob.digest)
    const accel = await chooseAccel(config, kernelPath, manifest.kernel.blob.digest)
    const id = `boot-${process.pid}-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`
    const forwards: PortForward[] = []
    for (const f of options.forwards ?? []) {
      forwards.push({ hostAddress: '127.0.0.1', hostPort: f.hostPort === 0 ? await freePort() : f.hostPort, guestPort: f.guestPort })
    }
    const driver = new QemuDriver()
    const timings: BootTimings = { spawnedAt: performance.now() }
    const vm = await driver.spawn({
      id,
      stateDir: join(config.dataDir, 'run', id),
      launch: {
        manifest,
        kernelPath,
        ...(manifest.rootfs !== undefined ? { rootfsPath: store.blobPath(manifest.rootfs.digest) } : {}),
        accel: accel.accel,
        vcpus: options.vcpus ?? manifest.vcpus,
        memoryMiB: options.memoryMiB ?? manifest.memoryMiB,
        network: { mode: 'user', forwards },
        guestNetwork: USER_NETWORK,
        hostname: manifest.name.split('/').pop() ?? 'guest',
        // As the daemon boots it: a container image expects a writable root.
        ...(manifest.overlaySizeMiB !== undefined && manifest.init !== null ? { overlaySizeMiB: manifest.overlaySizeMiB } : {})
      }
    })
    return new BootedImage(vm, forwards, accel, timings, driver)
  }

  /** Resolves when the init prints a marker of that kind; rejects on exit or deadline. */
  async waitForMarker (kind: ConsoleMarker['kind'], timeoutMs: number): Promise<ConsoleMarker> {
    return await this.vm.waitForMarker(kind, timeoutMs)
  }

  /** The control channel, connected on first use. */
  async control (): Promise<ControlChannel> {
    const socket = this.vm.controlSocket
    if (socket === undefined) throw new UigniterError('UIG_ERR_CONTROL_CHANNEL', 'this image has no guest init, so it has no control channel')
    this.#control ??= await ControlChannel.connect(socket)
    return this.#control
  }

  /** Stops the guest as the daemon does (the init stops the app, then harsher steps). */
  async shutdown (graceMs = 5000): Promise<VmExit> {
    // The control socket takes one client at a time: ours must not keep the stop's request out.
    this.#control?.close()
    this.#control = undefined
    await this.vm.stop({ graceMs })
    return await this.exited
  }

  /** Kills QEMU at once and waits for it. */
  async destroy (): Promise<VmExit> {
    this.vm.kill()
    return await this.exited
  }
}
