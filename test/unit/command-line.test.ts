import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import { buildQemuArgs, USER_NETWORK } from '../../src/vmm/qemu/command-line.js'

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
