import type { ImageManifest } from '../../core/image.js'

export type Accel = 'kvm' | 'tcg'

export interface PortForward { hostAddress: string, hostPort: number, guestPort: number }

export interface GuestNetwork { address: string, prefix: number, gateway?: string, dns?: string[] }

/** Everything needed to start one guest; files are host paths. */
export interface LaunchSpec {
  manifest: ImageManifest
  kernelPath: string
  rootfsPath?: string
  accel: Accel
  vcpus: number
  memoryMiB: number
  /** Where the serial console goes: QEMU's stdout, or a file. */
  console: { kind: 'stdio' } | { kind: 'file', path: string }
  /** Unix socket of the host↔guest control channel (images with our init only). */
  controlSocket?: string
  qmpSocket?: string
  network: { mode: 'none' } | { mode: 'user', forwards: PortForward[] }
  /** Told to the guest init on the kernel command line. */
  guestNetwork?: GuestNetwork
  hostname?: string
  /** Extra kernel parameters for our own guests (the accel probe uses it). */
  extraCmdline?: string[]
}

/** The address plan of QEMU's user-mode network (slirp). */
export const USER_NETWORK: GuestNetwork = { address: '10.0.2.15', prefix: 24, gateway: '10.0.2.2', dns: ['10.0.2.3'] }

/**
 * Builds QEMU's argv for a guest. This is the one place that knows QEMU's
 * command line; the driver grows from it. `microvm` with virtio-mmio boots our
 * kernel; q35/pc with virtio-pci boots unikernels that need a PC (fact 11).
 */
export function buildQemuArgs (spec: LaunchSpec): string[] {
  const { manifest } = spec
  const pci = manifest.machine.transport === 'pci'
  const dev = (name: string): string => `${name}-${pci ? 'pci' : 'device'}`
  const args: string[] = []

  if (manifest.machine.type === 'microvm') {
    // acpi=off: QEMU then lists the virtio-mmio devices on the kernel command line itself (fact 2).
    // rtc=on: without an RTC the kernel waits about 1 s for the CMOS clock at boot
    // ("Unable to read current time from RTC"); measured here: 2.26 s → 1.36 s to init.
    args.push('-M', 'microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off')
  } else {
    args.push('-M', manifest.machine.type)
  }
  args.push('-accel', spec.accel, '-cpu', spec.accel === 'kvm' ? 'host' : 'max')
  args.push('-smp', String(spec.vcpus), '-m', `${spec.memoryMiB}M`)
  // -no-reboot: the guest init reboots when the app exits (power-off hangs without ACPI, fact 4), so QEMU exits.
  args.push('-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot')
  args.push('-serial', spec.console.kind === 'stdio' ? 'stdio' : `file:${spec.console.path}`)
  if (spec.qmpSocket !== undefined) args.push('-qmp', `unix:${spec.qmpSocket},server=on,wait=off`)

  args.push('-kernel', spec.kernelPath)
  if (manifest.format === 'initramfs') {
    if (spec.rootfsPath === undefined) throw new Error('an initramfs image needs its rootfs path')
    args.push('-initrd', spec.rootfsPath)
  } else if (spec.rootfsPath !== undefined) {
    // Read-only: every VM of the image shares this one file.
    const format = manifest.format === 'unikernel' ? 'auto' : 'raw'
    args.push('-drive', `id=root,file=${spec.rootfsPath},if=none,read-only=on${format === 'raw' ? ',format=raw' : ''}`)
    args.push('-device', `${dev('virtio-blk')},drive=root`)
  }

  if (spec.network.mode === 'user') {
    const forwards = spec.network.forwards.map((f) => `,hostfwd=tcp:${f.hostAddress}:${f.hostPort}-:${f.guestPort}`).join('')
    args.push('-netdev', `user,id=net0${forwards}`)
    args.push('-device', `${dev('virtio-net')},netdev=net0${pci ? ',romfile=' : ''}`)
  }

  if (manifest.init !== null) {
    // Entropy from the host, so that the app's first getrandom() does not wait.
    args.push('-object', 'rng-random,id=rng0,filename=/dev/urandom', '-device', `${dev('virtio-rng')},rng=rng0`)
    if (spec.controlSocket !== undefined) {
      args.push('-device', dev('virtio-serial'))
      args.push('-chardev', `socket,id=ctl,path=${spec.controlSocket},server=on,wait=off`)
      args.push('-device', 'virtserialport,chardev=ctl,name=uigniter.ctl')
    }
  }

  args.push('-append', kernelCommandLine(spec))
  return args
}

/**
 * A unikernel's command line is used exactly as given. Our own guests get the
 * console, the reboot-to-exit parameters, and their network identity for the init.
 */
export function kernelCommandLine (spec: LaunchSpec): string {
  const { manifest } = spec
  if (manifest.init === null) return manifest.cmdline
  // reboot=t panic=-1: any end of the guest (app exit, panic) ends QEMU at once.
  const parts = ['console=ttyS0', 'reboot=t', 'panic=-1', 'quiet']
  if (manifest.cmdline !== '') parts.push(manifest.cmdline)
  const net = spec.guestNetwork
  if (net !== undefined) {
    parts.push(`uigniter.ip=${net.address}/${net.prefix}`)
    if (net.gateway !== undefined) parts.push(`uigniter.gw=${net.gateway}`)
    if (net.dns !== undefined && net.dns.length > 0) parts.push(`uigniter.dns=${net.dns.join(',')}`)
  }
  if (spec.hostname !== undefined) parts.push(`uigniter.hostname=${spec.hostname}`)
  parts.push(...(spec.extraCmdline ?? []))
  return parts.join(' ')
}
