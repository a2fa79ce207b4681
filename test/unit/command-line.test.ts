import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import { buildQemuArgs, encodeParam, kernelCommandLine, KERNEL_CMDLINE_MAX } from '../../src/vmm/qemu/command-line.js'
import { USER_NETWORK } from '../../src/core/ports/vmm-driver.js'

const digest = `sha256:${'a'.repeat(64)}`
const base: ImageManifest = {
  schemaVersion: 1, name: 'x', tag: 'latest', digest, size: 1, format: 'squashfs',
  kernel: { source: 'build', version: 'k', blob: { digest, size: 1 } },
  rootfs: { digest, size: 1 }, init: { version: 1, digest }, cmdline: 'root=/dev/vda ro rootfstype=squashfs init=/uigniter/init',
  entrypoint: ['/usr/bin/x'], env: {}, workdir: '/', vcpus: 1, memoryMiB: 64, ports: [],
  machine: { type: 'microvm', transport: 'mmio' }, createdAt: new Date(0).toISOString()
}

function argAfter (args: string[], flag: string): string[] {
  return args.flatMap((a, i) => (a === flag ? [args[i + 1] ?? ''] : []))
}

test('our image on microvm: virtio-mmio devices, read-only shared disk, init parameters', () => {
  const args = buildQemuArgs({
    manifest: base, kernelPath: '/k', rootfsPath: '/disk', accel: 'tcg', vcpus: 2, memoryMiB: 96,
    console: { kind: 'stdio' }, controlSocket: '/run/ctl.sock', network: { mode: 'user', forwards: [{ hostAddress: '127.0.0.1', hostPort: 18080, guestPort: 8080 }] },
    guestNetwork: USER_NETWORK, hostname: 'web-1'
  })
  assert.deepEqual(argAfter(args, '-M'), ['microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off'])
  assert.deepEqual(argAfter(args, '-accel'), ['tcg'])
  assert.deepEqual(argAfter(args, '-smp'), ['2'])
  assert.deepEqual(argAfter(args, '-m'), ['96M'])
  assert.ok(args.includes('-no-reboot'))
  assert.deepEqual(argAfter(args, '-drive'), ['id=root,file=/disk,if=none,read-only=on,format=raw'])
  assert.ok(argAfter(args, '-device').includes('virtio-blk-device,drive=root'))
  assert.ok(argAfter(args, '-device').includes('virtserialport,chardev=ctl,name=uigniter.ctl'))
  assert.deepEqual(argAfter(args, '-netdev'), ['user,id=net0,hostfwd=tcp:127.0.0.1:18080-:8080'])
  const append = argAfter(args, '-append')[0] ?? ''
  for (const p of ['console=ttyS0', 'reboot=t', 'root=/dev/vda', 'uigniter.ip=10.0.2.15/24', 'uigniter.gw=10.0.2.2', 'uigniter.dns=10.0.2.3', 'uigniter.hostname=web-1']) {
    assert.ok(append.split(' ').includes(p), `${p} in ${append}`)
  }
})

test('a unikernel on q35: virtio-pci devices without option ROMs, command line exactly as given', () => {
  const manifest: ImageManifest = { ...base, format: 'unikernel', init: null, cmdline: '--ip=eth0,10.0.0.2,255.255.255.0 /app', machine: { type: 'q35', transport: 'pci' } }
  const args = buildQemuArgs({
    manifest, kernelPath: '/kernel.elf', rootfsPath: '/osv.qcow2', accel: 'kvm', vcpus: 1, memoryMiB: 128,
    console: { kind: 'stdio' }, network: { mode: 'user', forwards: [] }
  })
  assert.deepEqual(argAfter(args, '-M'), ['q35'])
  assert.deepEqual(argAfter(args, '-cpu'), ['host'])
  assert.ok(argAfter(args, '-device').includes('virtio-blk-pci,drive=root'))
  assert.ok(argAfter(args, '-device').includes('virtio-net-pci,netdev=net0,romfile='))
  assert.ok(!argAfter(args, '-device').some((d) => d.startsWith('virtserialport')), 'nothing is injected into a unikernel')
  assert.deepEqual(argAfter(args, '-append'), ['--ip=eth0,10.0.0.2,255.255.255.0 /app'])
})

test('the driver\'s launch: tap network, console log QEMU appends to, pidfile, overlay disk, 9p shares, per-VM args and env', () => {
  const args = buildQemuArgs({
    manifest: base, kernelPath: '/k', rootfsPath: '/disk', accel: 'tcg', vcpus: 1, memoryMiB: 64,
    console: { kind: 'log', path: '/vms/a/console.log' }, qmpSocket: '/vms/a/qmp.sock', pidFile: '/vms/a/qemu.pid', name: 'a',
    controlSocket: '/vms/a/ctl.sock',
    network: { mode: 'tap', tap: 'uig-a1b2', mac: '02:00:0a:4d:00:05' },
    guestNetwork: { address: '10.77.0.5', prefix: 24, gateway: '10.77.0.1' },
    overlayPath: '/vms/a/overlay.img',
    shares: [{ hostPath: '/srv/data,x', guestPath: '/data', readOnly: true }, { hostPath: '/srv/out', guestPath: '/var/out', readOnly: false }],
    appArgs: ['--port', '80 80', 'a:b'],
    appEnv: { MODE: 'fast & "safe"', EMPTY: '' }
  })
  assert.deepEqual(argAfter(args, '-netdev'), ['tap,id=net0,ifname=uig-a1b2,script=no,downscript=no'])
  assert.ok(argAfter(args, '-device').includes('virtio-net-device,netdev=net0,mac=02:00:0a:4d:00:05'))
  assert.deepEqual(argAfter(args, '-serial'), ['chardev:serial0'])
  assert.ok(argAfter(args, '-chardev').includes('null,id=serial0,logfile=/vms/a/console.log,logappend=on'))
  assert.deepEqual(argAfter(args, '-pidfile'), ['/vms/a/qemu.pid'])
  assert.deepEqual(argAfter(args, '-qmp'), ['unix:/vms/a/qmp.sock,server=on,wait=off'])
  assert.deepEqual(argAfter(args, '-name'), ['guest=a,debug-threads=on'])
  assert.deepEqual(argAfter(args, '-drive'), [
    'id=root,file=/disk,if=none,read-only=on,format=raw',
    'id=overlay,file=/vms/a/overlay.img,if=none,format=raw,discard=unmap'
  ])
  // A comma in a path is doubled: QEMU's option syntax.
  assert.deepEqual(argAfter(args, '-fsdev'), [
    'local,id=fs0,path=/srv/data,,x,security_model=none,readonly=on',
    'local,id=fs1,path=/srv/out,security_model=none'
  ])
  assert.ok(argAfter(args, '-device').includes('virtio-9p-device,fsdev=fs0,mount_tag=uigniter0'))
  const append = (argAfter(args, '-append')[0] ?? '').split(' ')
  for (const p of ['uigniter.ip=10.77.0.5/24', 'uigniter.gw=10.77.0.1', 'uigniter.overlay=/dev/vdb',
    'uigniter.mount=uigniter0:/data:ro', 'uigniter.mount=uigniter1:/var/out',
    'uigniter.arg=--port', 'uigniter.arg=80%2080', 'uigniter.arg=a%3Ab',
    'uigniter.env=MODE=fast%20%26%20%22safe%22', 'uigniter.env=EMPTY=']) {
    assert.ok(append.includes(p), `${p} in ${append.join(' ')}`)
  }
  assert.deepEqual(append.filter((p) => p.startsWith('uigniter.arg=')), ['uigniter.arg=--port', 'uigniter.arg=80%2080', 'uigniter.arg=a%3Ab'], 'in order')
})

test('kernel parameters: no arguments is said explicitly; an initramfs guest\'s overlay is vda; bad inputs are refused', () => {
  const spec = {
    manifest: { ...base, format: 'initramfs' as const, cmdline: '' }, kernelPath: '/k', rootfsPath: '/initrd', accel: 'tcg' as const, vcpus: 1, memoryMiB: 64,
    console: { kind: 'stdio' as const }, network: { mode: 'none' as const }
  }
  const append = kernelCommandLine({ ...spec, appArgs: [], overlayPath: '/o.img' }).split(' ')
  assert.ok(append.includes('uigniter.noargs'))
  assert.ok(!append.some((p) => p.startsWith('uigniter.arg=')))
  assert.ok(append.includes('uigniter.overlay=/dev/vda'))
  assert.ok(!kernelCommandLine(spec).includes('uigniter.noargs'), 'no override: the image\'s arguments')
  assert.equal(encodeParam('a b:c%d\u00e9'), 'a%20b%3Ac%25d%C3%A9')

  assert.throws(() => buildQemuArgs({ ...spec, appArgs: ['nul\0byte'] }), { code: 'UIG_ERR_VM_CMDLINE_INVALID' })
  assert.throws(() => buildQemuArgs({ ...spec, shares: [{ hostPath: '/x', guestPath: '/', readOnly: true }] }), { code: 'UIG_ERR_VM_SHARE_INVALID' })
  assert.throws(() => buildQemuArgs({ ...spec, shares: [{ hostPath: '/x', guestPath: '/a/../b', readOnly: true }] }), { code: 'UIG_ERR_VM_SHARE_INVALID' })
  assert.throws(() => buildQemuArgs({ ...spec, network: { mode: 'tap', tap: 'bad name', mac: '02:00:00:00:00:01' } }), /invalid tap name/)
  // QEMU adds one "virtio_mmio.device=" parameter per device: the limit counts them.
  const long = Array.from({ length: 2047 - kernelCommandLine(spec).length - 40 }, () => 'x').join('')
  const oneDevice = { ...spec, appArgs: [long.slice(0, long.length - 14)] }
  assert.ok(kernelCommandLine(oneDevice).length <= KERNEL_CMDLINE_MAX)
  assert.doesNotThrow(() => buildQemuArgs(oneDevice))
  assert.throws(() => buildQemuArgs({ ...oneDevice, network: { mode: 'user', forwards: [] } }),
    (err: Error & { code?: string }) => err.code === 'UIG_ERR_VM_CMDLINE_INVALID' && /2047/.test(err.message))
})

test('templates and clones: guest RAM in a file, shared for a template and private for a clone; a clone waits for its state', () => {
  const launch = {
    manifest: base, kernelPath: '/k', rootfsPath: '/disk', accel: 'tcg' as const, vcpus: 1, memoryMiB: 64,
    console: { kind: 'stdio' as const }, network: { mode: 'user' as const, forwards: [{ hostAddress: '127.0.0.1', hostPort: 18081, guestPort: 8080, guestAddress: '10.0.2.16' }] }
  }
  const template = buildQemuArgs({ ...launch, memory: { path: '/dev/shm/t,1/memory.ram', share: true } })
  assert.deepEqual(argAfter(template, '-M'), ['microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,memory-backend=mem'])
  assert.deepEqual(argAfter(template, '-object').filter((o) => o.startsWith('memory-backend-file')),
    ['memory-backend-file,id=mem,size=64M,mem-path=/dev/shm/t,,1/memory.ram,share=on'])
  assert.deepEqual(argAfter(template, '-incoming'), [])
  assert.deepEqual(argAfter(template, '-netdev'), ['user,id=net0,hostfwd=tcp:127.0.0.1:18081-10.0.2.16:8080'])

  const clone = buildQemuArgs({ ...launch, memory: { path: '/t/memory.ram', share: false }, incoming: 'defer' })
  assert.ok(argAfter(clone, '-object').includes('memory-backend-file,id=mem,size=64M,mem-path=/t/memory.ram,share=off'))
  assert.deepEqual(argAfter(clone, '-incoming'), ['defer'])

  const q35 = buildQemuArgs({ ...launch, manifest: { ...base, machine: { type: 'q35', transport: 'pci' } }, memory: { path: '/m', share: true } })
  assert.deepEqual(argAfter(q35, '-M'), ['q35,memory-backend=mem'])
  const plain = buildQemuArgs(launch)
  assert.ok(!argAfter(plain, '-object').some((o) => o.startsWith('memory-backend')))
  assert.deepEqual(argAfter(plain, '-M'), ['microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off'])
})

test('the jail: seccomp without spawn, a numeric uid:gid and the chroot, none without a jail', () => {
  const launch = {
    manifest: base, kernelPath: '/k', rootfsPath: '/disk', accel: 'tcg' as const, vcpus: 1, memoryMiB: 64,
    console: { kind: 'stdio' as const }, network: { mode: 'tap' as const, tap: 'uig0123456789ab', mac: '52:54:00:12:34:56' }
  }
  const jailed = buildQemuArgs({ ...launch, jail: { uid: 640_007, gid: 640_000, root: '/var/lib/uigniter/vms/a/root' } })
  // elevateprivileges stays allowed: denying it kills QEMU with SIGSYS when -runas drops to the uid (fact 12).
  assert.deepEqual(argAfter(jailed, '-sandbox'), ['on,obsolete=deny,spawn=deny,resourcecontrol=deny'])
  assert.deepEqual(argAfter(jailed, '-runas'), ['640007:640000'])
  assert.deepEqual(argAfter(jailed, '-chroot'), ['/var/lib/uigniter/vms/a/root'])
  // The tap is opened by name while QEMU is still root, before it chroots and drops to the uid.
  assert.deepEqual(argAfter(jailed, '-netdev'), ['tap,id=net0,ifname=uig0123456789ab,script=no,downscript=no'])
  const plain = buildQemuArgs(launch)
  for (const flag of ['-sandbox', '-runas', '-chroot']) assert.deepEqual(argAfter(plain, flag), [])
  assert.throws(() => buildQemuArgs({ ...launch, jail: { uid: 0, gid: 640_000, root: '/r' } }), /never run as root/)
})

/** An image whose init mounts volumes. */
const withVolumes: ImageManifest = { ...base, init: { version: 4, digest } }

test('volumes: a raw disk per volume after the overlay, named by its serial; read-only; the init\'s uigniter.volume=', () => {
  const launch = {
    manifest: withVolumes, kernelPath: '/k', rootfsPath: '/disk', accel: 'tcg' as const, vcpus: 1, memoryMiB: 64,
    console: { kind: 'stdio' as const }, network: { mode: 'none' as const },
    overlayPath: '/vms/a/overlay.img',
    shares: [{ hostPath: '/srv/cfg', guestPath: '/etc/app', readOnly: true }],
    volumes: [
      { hostPath: '/var/lib/uigniter/volumes/db,1.img', guestPath: '/var/lib/db/', readOnly: false },
      { hostPath: '/var/lib/uigniter/volumes/assets.img', guestPath: '/srv/my assets', readOnly: true }
    ]
  }
  const args = buildQemuArgs(launch)
  assert.deepEqual(argAfter(args, '-drive'), [
    'id=root,file=/disk,if=none,read-only=on,format=raw',
    'id=overlay,file=/vms/a/overlay.img,if=none,format=raw,discard=unmap',
    // No cache= option: QEMU's default writeback turns the guest's flushes into fdatasync.
    'id=vol0,file=/var/lib/uigniter/volumes/db,,1.img,if=none,format=raw,discard=unmap',
    'id=vol1,file=/var/lib/uigniter/volumes/assets.img,if=none,format=raw,discard=unmap,read-only=on'
  ])
  const devices = argAfter(args, '-device')
  assert.ok(devices.includes('virtio-blk-device,drive=vol0,serial=uigniter-vol0'), devices.join(' '))
  assert.ok(devices.includes('virtio-blk-device,drive=vol1,serial=uigniter-vol1'))
  const append = (argAfter(args, '-append')[0] ?? '').split(' ')
  // The overlay keeps its name: the volumes come after it.
  assert.ok(append.includes('uigniter.overlay=/dev/vdb'))
  // In path order (see below), each with its disk's index.
  assert.deepEqual(append.filter((p) => p.startsWith('uigniter.volume=')), ['uigniter.volume=1:/srv/my%20assets:ro', 'uigniter.volume=0:/var/lib/db'])

  const pci = buildQemuArgs({ ...launch, manifest: { ...withVolumes, machine: { type: 'q35', transport: 'pci' } } })
  assert.ok(argAfter(pci, '-device').includes('virtio-blk-pci,drive=vol1,serial=uigniter-vol1'))
})

test('volumes: bad guest paths, two on one path, one on a share\'s path, a unikernel, an init that predates volumes, and the command line\'s limit are refused', () => {
  const launch = {
    manifest: withVolumes, kernelPath: '/k', rootfsPath: '/disk', accel: 'tcg' as const, vcpus: 1, memoryMiB: 64,
    console: { kind: 'stdio' as const }, network: { mode: 'none' as const }
  }
  const vol = (guestPath: string, readOnly = false): { hostPath: string, guestPath: string, readOnly: boolean } => ({ hostPath: `/v/${guestPath.length}.img`, guestPath, readOnly })
  const refused = (over: object, message: RegExp): void => {
    assert.throws(() => buildQemuArgs({ ...launch, ...over }), (err: Error & { code?: string }) => err.code === 'UIG_ERR_VOLUME_INVALID' && message.test(err.message), message.source)
  }
  for (const bad of ['/', 'data', '/a/../b', '/a//b', '/./a', '']) refused({ volumes: [vol(bad)] }, /normalized absolute path/)
  refused({ volumes: [vol('/data'), vol('/data/', true)] }, /two volumes are attached at \/data/)
  refused({ volumes: [vol('/data')], shares: [{ hostPath: '/s', guestPath: '/data/', readOnly: false }] }, /a volume and a shared directory are both attached at \/data/)
  refused({ manifest: { ...base, format: 'unikernel', init: null, cmdline: '/app' }, volumes: [vol('/data')] }, /a unikernel has no init to mount it/)
  refused({ manifest: base, volumes: [vol('/data')] }, /predates volumes and would start its app without them; rebuild/)
  refused({ volumes: [vol('/srv/db')], shares: [{ hostPath: '/s', guestPath: '/srv', readOnly: false }] }, /inside the shared directory at \/srv/)
  // A share inside a volume is fine (volumes are mounted first), and so is a volume inside another,
  // whose parameter comes after its parent's whatever their order: the init mounts in parameter order.
  const nested = kernelCommandLine({ ...launch, volumes: [vol('/data/logs'), vol('/data'), vol('/data-2')], shares: [{ hostPath: '/s', guestPath: '/data/cfg', readOnly: true }] })
  assert.deepEqual(nested.split(' ').filter((p) => p.startsWith('uigniter.volume=')), ['uigniter.volume=1:/data', 'uigniter.volume=2:/data-2', 'uigniter.volume=0:/data/logs'])

  // Each volume adds a device, whose virtio_mmio.device= parameter QEMU appends, and its own parameter.
  const many = Array.from({ length: 40 }, (_, i) => vol(`/volumes/number-${i}-with-a-long-name`))
  assert.throws(() => buildQemuArgs({ ...launch, volumes: many }),
    (err: Error & { code?: string }) => err.code === 'UIG_ERR_VM_CMDLINE_INVALID' && /for 42 devices/.test(err.message) && /volumes/.test(err.message))
})
