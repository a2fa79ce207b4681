import assert from 'node:assert/strict'
import { test } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import { USER_NETWORK } from '../../src/core/ports/vmm-driver.js'
import { kernelCommandLine } from '../../src/vmm/qemu/command-line.js'
import { hostTscKhz, parseHostTscKhz } from '../../src/vmm/qemu/host-tsc.js'

const digest = `sha256:${'a'.repeat(64)}`
const ours: ImageManifest = {
  schemaVersion: 1, name: 'x', tag: 'latest', digest, size: 1, format: 'initramfs',
  kernel: { source: 'build', version: 'k', blob: { digest, size: 1 } },
  rootfs: { digest, size: 1 }, init: { version: 1, digest }, cmdline: '',
  entrypoint: ['/x'], env: {}, workdir: '/', vcpus: 1, memoryMiB: 64, ports: [],
  machine: { type: 'microvm', transport: 'mmio' }, createdAt: new Date(0).toISOString()
}
const spec = { manifest: ours, kernelPath: '/k', accel: 'tcg' as const, vcpus: 1, memoryMiB: 64, console: { kind: 'stdio' as const }, network: { mode: 'user' as const, forwards: [] }, guestNetwork: USER_NETWORK }
const params = (s: Parameters<typeof kernelCommandLine>[0]): string[] => kernelCommandLine(s).split(' ')

const CPUINFO = 'processor\t: 0\nflags\t\t: fpu tsc constant_tsc nonstop_tsc tsc_known_freq\nbogomips\t: 4192.03\n\nprocessor\t: 1\nbogomips\t: 4192.03\n'

test('the host TSC frequency comes from bogomips, only for an invariant TSC the host keeps time with', () => {
  assert.equal(parseHostTscKhz(CPUINFO, 'tsc\n'), 2096015)
  assert.equal(parseHostTscKhz(CPUINFO, 'kvm-clock\n'), 2096015)
  assert.equal(parseHostTscKhz(CPUINFO, 'hpet\n'), undefined, 'a host that does not trust its TSC')
  assert.equal(parseHostTscKhz(CPUINFO.replace(' nonstop_tsc', ''), 'tsc'), undefined, 'a TSC that stops in deep idle')
  assert.equal(parseHostTscKhz(CPUINFO.replace(/bogomips.*/g, 'bogomips\t: 3.99'), 'tsc'), undefined, 'out of range')
  assert.equal(parseHostTscKhz('flags : constant_tsc nonstop_tsc\n', 'tsc'), undefined, 'no bogomips line')
})

test('our guests skip the timer check; under TCG also the TSC and APIC timer calibrations, the clocksource watchdog and UP lock patching', () => {
  const tcg = params(spec)
  assert.ok(tcg.includes('no_timer_check'))
  assert.ok(tcg.includes('uigniter.apic_timer_hz=1000000000'))
  assert.ok(tcg.includes('noreplace-smp'))
  const khz = hostTscKhz()
  if (khz !== undefined) {
    assert.ok(tcg.includes(`tsc_early_khz=${khz}`))
    assert.ok(tcg.includes('tsc=reliable'))
  }
  assert.ok(!tcg.includes('noapictimer'), 'the local APIC timer stays: the PIT instead would wake an idle guest every 27 ms')
  const kvm = params({ ...spec, accel: 'kvm' })
  assert.ok(kvm.includes('no_timer_check'))
  assert.ok(!kvm.some((p) => p.startsWith('tsc') || p.startsWith('uigniter.apic_timer_hz=') || p === 'noreplace-smp'), 'KVM has kvmclock and a TSC-deadline timer')
  const cloud = params({ ...spec, manifest: { ...ours, kernel: { ...ours.kernel, source: 'debian-cloud' }, machine: { type: 'q35', transport: 'pci' } } })
  assert.ok(!cloud.some((p) => p.startsWith('uigniter.apic_timer_hz=')), 'Debian\'s kernel does not know our parameter')
})

test('a unikernel\'s command line gets none of them', () => {
  const unikernel = params({ ...spec, manifest: { ...ours, format: 'unikernel', init: null, cmdline: '/hello' } })
  assert.deepEqual(unikernel, ['/hello'])
})
