import { posix } from 'node:path'
import { cmdlineValues, substituteCmdline } from '../../core/cmdline-placeholders.js'
import { UigniterError } from '../../core/errors.js'
import type { GuestLaunch } from '../../core/ports/vmm-driver.js'
import { hostTscKhz } from './host-tsc.js'
import { jailArgs } from './jail.js'
import { VOLUMES_INIT_VERSION } from '../../guest/image-builder.js'

/**
 * Everything needed to start one guest: the driver port's launch plus what
 * the QEMU driver owns (the state directory's files, the jail). Files are
 * host paths.
 */
export type LaunchSpec = Omit<GuestLaunch, 'overlaySizeMiB'> & {
  /**
   * Where the serial console goes: QEMU's stdout, a file QEMU truncates, or a
   * log QEMU appends to (`log`: the driver rotates it while QEMU keeps writing).
   */
  console: { kind: 'stdio' } | { kind: 'file', path: string } | { kind: 'log', path: string }
  /** Unix socket of the host↔guest control channel (images with our init only). */
  controlSocket?: string
  qmpSocket?: string
  /** QEMU writes its pid here (`-pidfile`), so that the VM can be found again. */
  pidFile?: string
  /** Shown in `ps` thread names and QEMU's messages. */
  name?: string
  /** A writable ext4 disk the init lays over the read-only root (overlayfs). */
  overlayPath?: string
  /**
   * Run QEMU jailed (docs/jail.md): seccomp, as this uid and gid, chrooted
   * into `root`. Every path above is opened before the chroot.
   */
  jail?: { uid: number, gid: number, root: string }
}

/**
 * x86's COMMAND_LINE_SIZE is 2048 bytes with the terminating NUL; the kernel
 * cuts anything longer silently, which would lose parameters at the end.
 */
export const KERNEL_CMDLINE_MAX = 2047

/** What QEMU appends per virtio-mmio device: " virtio_mmio.device=512@0xfeb00e00:12" (measured on QEMU 7.2). */
const MMIO_PARAM_BYTES = 37

const TAP_RE = /^[A-Za-z0-9_.-]{1,15}$/
const MAC_RE = /^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$/i

/**
 * Builds QEMU's argv for a guest. This is the one place that knows QEMU's
 * command line. `microvm` with virtio-mmio boots our kernel; q35/pc with
 * virtio-pci boots unikernels that need a PC (fact 11).
 */
export function buildQemuArgs (spec: LaunchSpec): string[] {
  const { manifest } = spec
  const pci = manifest.machine.transport === 'pci'
  const dev = (name: string): string => `${name}-${pci ? 'pci' : 'device'}`
  const args: string[] = []

  if (spec.name !== undefined) args.push('-name', `guest=${opt(spec.name)},debug-threads=on`)
  // The machine takes its RAM from this backend instead of allocating it (fact 5).
  const memoryBackend = spec.memory !== undefined ? ',memory-backend=mem' : ''
  if (manifest.machine.type === 'microvm') {
    // acpi=off: QEMU then lists the virtio-mmio devices on the kernel command line itself (fact 2).
    // rtc=on: without an RTC the kernel waits about 1 s for the CMOS clock at boot
    // ("Unable to read current time from RTC"); measured here: 2.26 s → 1.36 s to init.
    args.push('-M', `microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off${memoryBackend}`)
  } else {
    args.push('-M', `${manifest.machine.type}${memoryBackend}`)
  }
  args.push('-accel', accelOption(spec), '-cpu', spec.accel === 'kvm' ? 'host' : 'max')
  args.push('-smp', String(spec.vcpus), '-m', `${spec.memoryMiB}M`)
  if (spec.memory !== undefined) {
    // The backend's size must equal -m, or QEMU refuses to start.
    args.push('-object', `memory-backend-file,id=mem,size=${spec.memoryMiB}M,mem-path=${opt(spec.memory.path)},share=${spec.memory.share ? 'on' : 'off'}`)
  }
  // -no-reboot: the guest init reboots when the app exits (power-off hangs without ACPI, fact 4), so QEMU exits.
  args.push('-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot')
  if (spec.startPaused === true) args.push('-S')
  if (spec.console.kind === 'log') {
    // QEMU appends to the log itself, so the output is kept while no daemon
    // reads it; O_APPEND lets the driver truncate it under QEMU's feet.
    args.push('-chardev', `null,id=serial0,logfile=${opt(spec.console.path)},logappend=on`, '-serial', 'chardev:serial0')
  } else {
    args.push('-serial', spec.console.kind === 'stdio' ? 'stdio' : `file:${spec.console.path}`)
  }
  if (spec.qmpSocket !== undefined) args.push('-qmp', `unix:${opt(spec.qmpSocket)},server=on,wait=off`)
  if (spec.pidFile !== undefined) args.push('-pidfile', spec.pidFile)

  args.push('-kernel', spec.kernelPath)
  if (manifest.format === 'initramfs') {
    if (spec.rootfsPath === undefined) throw new Error('an initramfs image needs its rootfs path')
    args.push('-initrd', spec.rootfsPath)
  } else if (spec.rootfsPath !== undefined) {
    // Read-only: every VM of the image shares this one file.
    const format = manifest.format === 'unikernel' ? 'auto' : 'raw'
    args.push('-drive', `id=root,file=${opt(spec.rootfsPath)},if=none,read-only=on${format === 'raw' ? ',format=raw' : ''}`)
    args.push('-device', `${dev('virtio-blk')},drive=root`)
  }
  if (spec.overlayPath !== undefined) {
    if (manifest.init === null) throw new Error('an overlay needs our guest init, and a unikernel has none')
    // After the root disk, so the guest names it vdb (vda without a root disk):
    // virtio-mmio devices probe in command-line order.
    args.push('-drive', `id=overlay,file=${opt(spec.overlayPath)},if=none,format=raw,discard=unmap`)
    args.push('-device', `${dev('virtio-blk')},drive=overlay,serial=uigniter-overlay`)
  }
  const volumes = spec.volumes ?? []
  if (volumes.length > 0 && manifest.init === null) {
    throw new UigniterError('UIG_ERR_VOLUME_INVALID', 'cannot attach a volume to a unikernel: a unikernel has no init to mount it')
  }
  if (volumes.length > 0 && (manifest.init?.version ?? 0) < VOLUMES_INIT_VERSION) {
    throw new UigniterError('UIG_ERR_VOLUME_INVALID', `image ${manifest.name}:${manifest.tag} has an init (version ${manifest.init?.version ?? 0}) that predates volumes and would start its app without them; rebuild (or pull again) the image`)
  }
  volumes.forEach((volume, i) => {
    // After the root and overlay disks, so that their names stay vda/vdb; the init
    // finds each volume by its serial, not by its place.
    // QEMU's default cache (writeback) stays: a write is done once in the host's page
    // cache, and the guest's flush (virtio-blk FLUSH, which ext4 sends on fsync and at
    // each journal commit) becomes an fdatasync of this file (QEMU's manual, -drive:
    // "safe as long as your guest OS makes sure to correctly flush disk caches";
    // block/file-posix.c handle_aiocb_flush). So what an app fsyncs is on the host's
    // disk, and a kill -9 of QEMU is a power cut that ext4's journal recovers from.
    args.push('-drive', `id=${volumeId(i)},file=${opt(volume.hostPath)},if=none,format=raw,discard=unmap${volume.readOnly ? ',read-only=on' : ''}`)
    args.push('-device', `${dev('virtio-blk')},drive=${volumeId(i)},serial=uigniter-${volumeId(i)}`)
  })

  const net = spec.network
  if (net.mode !== 'none') {
    if (net.mac !== undefined && !MAC_RE.test(net.mac)) throw new Error(`invalid MAC address "${net.mac}"`)
    const mac = net.mac !== undefined ? `,mac=${net.mac}` : ''
    if (net.mode === 'user') {
      const forwards = net.forwards.map((f) => `,hostfwd=tcp:${f.hostAddress}:${f.hostPort}-${f.guestAddress ?? ''}:${f.guestPort}`).join('')
      args.push('-netdev', `user,id=net0${forwards}`)
    } else {
      if (!TAP_RE.test(net.tap)) throw new Error(`invalid tap name "${net.tap}"`)
      // script=no: the tap exists and is on the bridge already; QEMU must not run /etc/qemu-ifup.
      args.push('-netdev', `tap,id=net0,ifname=${net.tap},script=no,downscript=no`)
    }
    args.push('-device', `${dev('virtio-net')},netdev=net0${mac}${pci ? ',romfile=' : ''}`)
  }

  const shares = spec.shares ?? []
  if (shares.length > 0 && manifest.init === null) throw new Error('shared directories need our guest init, and a unikernel has none')
  shares.forEach((share, i) => {
    // security_model=none: files keep their host owners and modes, as a bind mount would.
    args.push('-fsdev', `local,id=fs${i},path=${opt(share.hostPath)},security_model=none${share.readOnly ? ',readonly=on' : ''}`)
    args.push('-device', `${dev('virtio-9p')},fsdev=fs${i},mount_tag=${shareTag(i)}`)
  })

  if (manifest.init !== null) {
    // Entropy from the host, so that the app's first getrandom() does not wait.
    args.push('-object', 'rng-random,id=rng0,filename=/dev/urandom', '-device', `${dev('virtio-rng')},rng=rng0`)
    if (spec.controlSocket !== undefined) {
      args.push('-device', dev('virtio-serial'))
      args.push('-chardev', `socket,id=ctl,path=${opt(spec.controlSocket)},server=on,wait=off`)
      args.push('-device', 'virtserialport,chardev=ctl,name=uigniter.ctl')
    }
  }

  const cmdline = kernelCommandLine(spec)
  if (manifest.init !== null) {
    const mmioDevices = manifest.machine.type === 'microvm' && !pci
      ? args.filter((a, i) => args[i - 1] === '-device' && /^virtio-[a-z0-9]+-device,/.test(a + ',')).length
      : 0
    const total = Buffer.byteLength(cmdline) + mmioDevices * MMIO_PARAM_BYTES
    if (total > KERNEL_CMDLINE_MAX) {
      throw new UigniterError('UIG_ERR_VM_CMDLINE_INVALID',
        `the guest kernel command line would be ${total} bytes (${Buffer.byteLength(cmdline)} of parameters, ${mmioDevices * MMIO_PARAM_BYTES} that QEMU adds for ${mmioDevices} devices), ` +
        `over the kernel's limit of ${KERNEL_CMDLINE_MAX}: pass fewer or shorter app arguments and environment variables, or fewer shares and volumes`)
    }
  }
  args.push('-append', cmdline)
  if (spec.incoming === 'defer') args.push('-incoming', 'defer')
  if (spec.jail !== undefined) args.push(...jailArgs(spec.jail))
  return args
}

/**
 * TCG's translation buffer for a guest restored from a snapshot (a clone),
 * in MiB: a sixteenth of its RAM, 4 to 64. QEMU 7.2 reserves 1 GiB and backs
 * what it fills with huge pages, and the filled part stays for the life of
 * the process; a clone translates only what runs after its restore (a hello
 * clone about 7 MB by its first answer, a node-http clone about 30 MB by its
 * fiftieth), so a small buffer that QEMU flushes when full keeps an idle
 * clone small. Measured here: hello 4 MiB, 4.5 MiB less per clone than the
 * default, its first 20 answers as fast; node-http 16 MiB, 17 MiB less, its
 * first 50 answers about 10 % slower. A boot translates far more one-time
 * code, and a small buffer slowed node-http's from 4.6 s to 6.7 s: boots
 * keep QEMU's default.
 */
export function cloneTranslationBufferMiB (memoryMiB: number): number {
  return Math.min(64, Math.max(4, Math.round(memoryMiB / 16)))
}

function accelOption (spec: LaunchSpec): string {
  return spec.accel === 'tcg' && spec.incoming === 'defer' ? `tcg,tb-size=${cloneTranslationBufferMiB(spec.memoryMiB)}` : spec.accel
}

/**
 * A unikernel's command line is used as given, its placeholders filled. Our own guests get the
 * console, the reboot-to-exit parameters, and for the init: the network
 * identity, app arguments and environment, shares, volumes and overlay (docs/guest.md).
 */
export function kernelCommandLine (spec: LaunchSpec): string {
  const { manifest } = spec
  // Its placeholders ({ip}, {gateway}, ...) take this VM's values (docs/images.md).
  if (manifest.init === null) return substituteCmdline(manifest.cmdline, cmdlineValues(spec.guestNetwork, spec.hostname))
  // reboot=t panic=-1: any end of the guest (app exit, panic) ends QEMU at once.
  const parts = ['console=ttyS0', 'reboot=t', 'panic=-1', 'quiet', ...fastBootParams(spec)]
  if (manifest.cmdline !== '') parts.push(manifest.cmdline)
  const net = spec.guestNetwork
  if (net !== undefined) {
    parts.push(`uigniter.ip=${net.address}/${net.prefix}`)
    if (net.gateway !== undefined) parts.push(`uigniter.gw=${net.gateway}`)
    if (net.dns !== undefined && net.dns.length > 0) parts.push(`uigniter.dns=${net.dns.join(',')}`)
  }
  if (spec.hostname !== undefined) parts.push(`uigniter.hostname=${spec.hostname}`)
  if (spec.overlayPath !== undefined) parts.push(`uigniter.overlay=/dev/${spec.rootfsPath !== undefined && manifest.format !== 'initramfs' ? 'vdb' : 'vda'}`)
  const sharePaths = new Set<string>()
  ;(spec.shares ?? []).forEach((share, i) => {
    const path = guestMountPath(share.guestPath)
    if (path === undefined) {
      throw new UigniterError('UIG_ERR_VM_SHARE_INVALID', `guest path "${share.guestPath}" must be a normalized absolute path other than "/", such as /data`)
    }
    sharePaths.add(path)
    parts.push(`uigniter.mount=${shareTag(i)}:${encodeParam(path)}${share.readOnly ? ':ro' : ''}`)
  })
  const volumeParams: Array<{ path: string, param: string }> = []
  ;(spec.volumes ?? []).forEach((volume, i) => {
    const path = guestMountPath(volume.guestPath)
    if (path === undefined) {
      throw new UigniterError('UIG_ERR_VOLUME_INVALID', `volume guest path "${volume.guestPath}" must be a normalized absolute path other than "/", such as /data`)
    }
    // One mount would hide the other: the app would write where the host does not look.
    if (volumeParams.some((v) => v.path === path)) throw new UigniterError('UIG_ERR_VOLUME_INVALID', `two volumes are attached at ${path}: give each its own guest path`)
    if (sharePaths.has(path)) throw new UigniterError('UIG_ERR_VOLUME_INVALID', `a volume and a shared directory are both attached at ${path}: give each its own guest path`)
    // The init mounts volumes before shares, so a share above a volume would cover it.
    const above = [...sharePaths].find((share) => path.startsWith(`${share}/`))
    if (above !== undefined) throw new UigniterError('UIG_ERR_VOLUME_INVALID', `the volume at ${path} lies inside the shared directory at ${above}, which would hide it: attach it elsewhere`)
    // The init matches i with the disk whose serial is uigniter-vol<i> (docs/guest.md).
    volumeParams.push({ path, param: `uigniter.volume=${i}:${encodeParam(path)}${volume.readOnly ? ':ro' : ''}` })
  })
  // The init mounts in this order: a parent's path sorts before its children's, so a volume
  // inside another's path lands on the mounted parent instead of under it.
  volumeParams.sort((a, b) => a.path < b.path ? -1 : a.path > b.path ? 1 : 0)
  parts.push(...volumeParams.map((v) => v.param))
  if (spec.appArgs !== undefined) {
    // A bare flag says "no arguments", which no number of uigniter.arg= can.
    if (spec.appArgs.length === 0) parts.push('uigniter.noargs')
    for (const arg of spec.appArgs) parts.push(`uigniter.arg=${encodeParam(arg)}`)
  }
  for (const [key, value] of Object.entries(spec.appEnv ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new UigniterError('UIG_ERR_VM_CMDLINE_INVALID', `invalid environment variable name "${key}"`)
    parts.push(`uigniter.env=${key}=${encodeParam(value)}`)
  }
  parts.push(...(spec.extraCmdline ?? []))
  return parts.join(' ')
}

/**
 * What a guest on QEMU can skip at boot (issue 11; measured in docs/guest.md,
 * "Boot time"):
 * - `no_timer_check`: the kernel's test that the timer interrupt works waits
 *   4 ticks (40 ms at HZ=100); QEMU's does work.
 * Under TCG:
 * - `tsc_early_khz=` and `tsc=reliable`: the guest's TSC is the host's (QEMU
 *   reads the host's TSC), so its frequency is known (host-tsc.ts) and it is
 *   invariant. Calibrated against the emulated PIT instead, it fails when the
 *   vCPU thread is preempted, and the clocksource watchdog, comparing it with
 *   the jiffy on a busy host, can mark it unstable; either way the guest keeps
 *   a 10 ms clock and ticks all the time. Without the watchdog's wake-ups an
 *   idle hello also takes a third of the host CPU it took (0.38 → 0.12 % of
 *   a core).
 * - `uigniter.apic_timer_hz=1000000000` (our kernel, src/guest/kernel/source-edits.ts):
 *   QEMU's local APIC timer counts at 1 GHz; measuring it takes two loops of
 *   HZ/10 ticks, over 200 ms, and TCG has no TSC-deadline timer to skip them.
 * - `noreplace-smp`: a one-CPU boot patches the lock prefix out of some 4,000
 *   instructions, each a write to code TCG may have translated (a no-op with
 *   more CPUs, which keep their locks anyway).
 */
function fastBootParams (spec: LaunchSpec): string[] {
  const params = ['no_timer_check']
  if (spec.accel !== 'tcg') return params
  const tscKhz = hostTscKhz()
  if (tscKhz !== undefined) params.push(`tsc_early_khz=${tscKhz}`, 'tsc=reliable')
  if (spec.manifest.kernel.source === 'build') params.push(`uigniter.apic_timer_hz=${QEMU_APIC_TIMER_HZ}`)
  params.push('noreplace-smp')
  return params
}

/** The input clock of QEMU's emulated local APIC timer (measured by the kernel's own calibration here: 988 MHz under load). */
const QEMU_APIC_TIMER_HZ = 1_000_000_000

/**
 * A guest mount point as the init gets it (trailing slashes dropped), or
 * undefined when it is not a normalized absolute path other than "/".
 */
function guestMountPath (guestPath: string): string | undefined {
  const path = guestPath.replace(/\/+$/, '')
  return path.startsWith('/') && posix.normalize(path) === path ? path : undefined
}

/** The QEMU drive id of the i-th volume; its disk's serial is `uigniter-` and this. */
function volumeId (i: number): string {
  return `vol${i}`
}

/** The 9p mount tag of the i-th share. */
function shareTag (i: number): string {
  return `uigniter${i}`
}

/**
 * Percent-encodes a kernel parameter value: the kernel splits its command line
 * on spaces and treats quotes specially, and the init splits `uigniter.mount`
 * on ':'. Letters, digits and `-._~/=,@+` stay as they are, for readability.
 */
export function encodeParam (value: string): string {
  if (value.includes('\0')) throw new UigniterError('UIG_ERR_VM_CMDLINE_INVALID', 'an app argument or environment value holds a NUL byte, which a C program cannot receive')
  let out = ''
  for (const byte of Buffer.from(value, 'utf8')) {
    const c = String.fromCharCode(byte)
    out += /[A-Za-z0-9\-._~/=,@+]/.test(c) ? c : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`
  }
  return out
}

/** QEMU's option syntax splits on ','; a literal comma in a value is written twice. */
function opt (value: string): string {
  return value.replaceAll(',', ',,')
}
