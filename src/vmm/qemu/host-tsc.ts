import { readFileSync } from 'node:fs'

/**
 * The host's TSC frequency in kHz as its own kernel knows it, or undefined
 * when the host does not tell it reliably.
 *
 * Why: under TCG a guest's TSC is the host's (QEMU reads the host's TSC), so
 * our guest kernel can take this frequency (`tsc_early_khz=`) instead of
 * calibrating its TSC against the emulated PIT, a calibration that fails when
 * the vCPU thread is preempted: the guest then marks its TSC unstable, runs
 * the delay-loop calibration and keeps time with the 10 ms jiffy.
 *
 * Where from: Linux prints no TSC frequency in /proc, but on x86 its
 * loops_per_jiffy comes from the TSC frequency whenever that is known
 * (`tsc_khz * 1000 / HZ`), and bogomips is `loops_per_jiffy / (500000 / HZ)`:
 * so `tsc_khz = bogomips * 500`, to 5 kHz (a few ppm). It is trusted only for
 * an invariant TSC (`constant_tsc` and `nonstop_tsc`) that the host keeps
 * time with (clocksource `tsc`, or `kvm-clock` whose TSC rate the hypervisor
 * gave), and within 100 MHz to 10 GHz.
 *
 * @example parseHostTscKhz('flags : fpu constant_tsc nonstop_tsc\nbogomips : 4192.03\n', 'tsc') // 2096015
 */
export function parseHostTscKhz (cpuinfo: string, clocksource: string): number | undefined {
  if (!['tsc', 'kvm-clock'].includes(clocksource.trim())) return undefined
  const flags = new Set((/^flags\s*:(.*)$/m.exec(cpuinfo)?.[1] ?? '').trim().split(/\s+/))
  if (!flags.has('constant_tsc') || !flags.has('nonstop_tsc')) return undefined
  const bogomips = Number(/^bogomips\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*$/m.exec(cpuinfo)?.[1])
  const khz = Math.round(bogomips * 500)
  return Number.isFinite(khz) && khz >= 100_000 && khz <= 10_000_000 ? khz : undefined
}

let cached: { khz: number | undefined } | undefined

/** parseHostTscKhz for this host, read once per process (the TSC rate does not change while the host runs). */
export function hostTscKhz (): number | undefined {
  if (cached === undefined) {
    try {
      cached = { khz: parseHostTscKhz(readFileSync('/proc/cpuinfo', 'utf8'), readFileSync('/sys/devices/system/clocksource/clocksource0/current_clocksource', 'utf8')) }
    } catch {
      cached = { khz: undefined }
    }
  }
  return cached.khz
}
