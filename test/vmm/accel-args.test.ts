import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import { buildQemuArgs, cloneTranslationBufferMiB, type LaunchSpec } from '../../src/vmm/qemu/command-line.js'

const digest = `sha256:${'a'.repeat(64)}`
const manifest: ImageManifest = {
  schemaVersion: 1, name: 'app', tag: 'latest', digest, size: 1, format: 'squashfs',
  kernel: { source: 'build', version: 'k', blob: { digest, size: 1 } },
  rootfs: { digest, size: 1 }, init: { version: 3, digest }, cmdline: 'root=/dev/vda ro rootfstype=squashfs init=/uigniter/init',
  entrypoint: ['/usr/bin/app'], env: {}, workdir: '/', vcpus: 1, memoryMiB: 64, ports: [],
  machine: { type: 'microvm', transport: 'mmio' }, createdAt: new Date(0).toISOString()
}

const spec = (over: Partial<LaunchSpec>): LaunchSpec => ({
  manifest, kernelPath: '/k', rootfsPath: '/disk', accel: 'tcg', vcpus: 1, memoryMiB: 64,
  console: { kind: 'stdio' }, network: { mode: 'none' }, ...over
})

const accelOf = (args: string[]): string | undefined => args[args.indexOf('-accel') + 1]

test('a clone under TCG gets a translation buffer sized from its RAM; a boot, and KVM, keep the default', () => {
  assert.equal(accelOf(buildQemuArgs(spec({ incoming: 'defer', memoryMiB: 64 }))), 'tcg,tb-size=4')
  assert.equal(accelOf(buildQemuArgs(spec({ incoming: 'defer', memoryMiB: 256 }))), 'tcg,tb-size=16')
  assert.equal(accelOf(buildQemuArgs(spec({ memoryMiB: 256 }))), 'tcg')
  assert.equal(accelOf(buildQemuArgs(spec({ incoming: 'defer', accel: 'kvm' }))), 'kvm')
})

test('the clone translation buffer stays between 4 and 64 MiB', () => {
  assert.deepEqual([32, 64, 128, 256, 1024, 4096, 65536].map(cloneTranslationBufferMiB), [4, 4, 8, 16, 64, 64, 64])
})
