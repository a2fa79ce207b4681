import { constants } from 'node:os'
import type { VmExit } from '../../core/vm.js'

/** Everything known about a VM's end when it is decided. */
export interface ExitEvidence {
  pid: number
  /** What uigniter asked for, and how far a stop had to escalate. */
  requested?: { kind: 'stop', step: 'guest' | 'quit' | 'sigterm' | 'sigkill', graceMs: number } | { kind: 'kill' }
  /** From the console (ConsoleFacts). */
  console: {
    init: boolean
    exit?: { code?: number, signal?: number }
    execFailed?: { errno: number, error: string }
    initFailed?: string
    panic?: string
  }
  /** QEMU's SHUTDOWN event, when QMP saw one. */
  shutdown?: { reason: string, guest: boolean }
  /** The exit status, known for a QEMU this process spawned. */
  status?: { code: number | null, signal: string | null }
  /** The kernel's OOM-killer record for QEMU's pid. */
  oomKill?: string
  /** The OOM killer killed a process in the jailed QEMU's own cgroup: QEMU went over its memory limit. */
  memoryLimitKill?: { limitMiB: number, memoryMiB: number }
  /** The VM had ended before this daemon looked at it (adoption after a restart). */
  foundDead?: boolean
  qemuLogTail?: string
  at?: Date
}

const KILL_SIGNALS = new Set(['SIGKILL', 'SIGTERM', 'SIGINT', 'SIGHUP', 'SIGQUIT'])

/**
 * Decides why a VM ended, in order of certainty: the init's report of the
 * app's end, what uigniter itself asked for, QEMU's SHUTDOWN reason, the
 * process status, the host kernel's OOM record. `detail` is one line a
 * person can act on.
 */
export function decideExit (e: ExitEvidence): VmExit {
  const at = (e.at ?? new Date()).toISOString()
  const out = (reason: VmExit['reason'], detail: string, app?: { code?: number, signal?: number }): VmExit => ({
    reason,
    ...(app?.code !== undefined ? { appExitCode: app.code } : {}),
    ...(app?.signal !== undefined ? { appSignal: app.signal } : {}),
    detail,
    at
  })
  const c = e.console
  const panic = c.panic !== undefined ? `: ${c.panic}` : ''

  if (c.execFailed !== undefined) {
    return out('exec-failed', `the app could not be started: ${c.execFailed.error} (errno ${c.execFailed.errno}); check the image's entrypoint and the app arguments`, c.exit ?? { code: 127 })
  }
  if (e.requested?.kind === 'kill') return out('killed', 'killed on request (SIGKILL to QEMU)', c.exit)
  if (e.requested?.kind === 'stop') return out('stopped', describeStop(e.requested, c.exit, e.shutdown), c.exit)
  if (c.exit !== undefined) return out('app-exited', describeAppExit(c.exit), c.exit)
  if (c.initFailed !== undefined) return out('boot-failed', `the guest init failed: ${c.initFailed}`)

  const shutdownReason = e.shutdown?.reason
  switch (shutdownReason) {
    case undefined: break
    case 'host-qmp-quit': return out('stopped', 'QEMU was told to quit over QMP by a client other than uigniter')
    case 'host-qmp-system-reset': return out('stopped', 'the VM was reset over QMP, which ends a VM that runs with -no-reboot')
    case 'host-signal': return out('killed', 'QEMU was sent a termination signal (SIGTERM, SIGINT or SIGHUP) from outside uigniter and shut down')
    case 'host-error': return out('crashed', `QEMU stopped on a host error${oneLine(e.qemuLogTail)}`)
    default:
      // guest-reset (reboot=t, also after a panic with panic=-1), guest-panic, guest-shutdown.
      if (!c.init) return out('boot-failed', `the guest kernel stopped before the init ran${panic || ' (no panic message on the console; read console.log)'}`)
      return out('crashed', `the guest stopped without the init reporting the app's end${panic || ` (SHUTDOWN reason ${shutdownReason}; read console.log)`}`)
  }

  if (e.memoryLimitKill !== undefined) {
    const { limitMiB, memoryMiB } = e.memoryLimitKill
    return out('out-of-memory', `QEMU (pid ${e.pid}) went over its memory limit of ${limitMiB} MiB (the guest's ${memoryMiB} MiB of RAM and ${limitMiB - memoryMiB} MiB for QEMU itself) ` +
      'and the kernel killed it, alone, in its cgroup; give the VM more memory, or raise jail.memoryOverheadMiB if QEMU itself needs more')
  }
  if (e.oomKill !== undefined) {
    return out('out-of-memory', `the host ran out of memory and its OOM killer killed QEMU (pid ${e.pid}): "${e.oomKill}"; give the host more memory or the VMs less`)
  }
  if (e.status?.signal != null) {
    if (KILL_SIGNALS.has(e.status.signal)) {
      return out('killed', `QEMU (pid ${e.pid}) was killed by ${e.status.signal} from outside uigniter (not by the host's OOM killer)`)
    }
    return out('crashed', `QEMU (pid ${e.pid}) crashed with ${e.status.signal}${oneLine(e.qemuLogTail)}`)
  }
  if (e.status?.code != null) {
    return out('crashed', `QEMU (pid ${e.pid}) exited with code ${e.status.code} without a shutdown event${oneLine(e.qemuLogTail)}`)
  }
  if (e.foundDead === true) {
    if (c.panic !== undefined) return out('crashed', `the guest panicked while the daemon was not running${panic}`)
    return out('died-while-daemon-down', `QEMU (pid ${e.pid}) ended while the daemon was not running; the console shows no app exit (killed, or the host rebooted?)`)
  }
  return out('killed', `QEMU (pid ${e.pid}) ended without a shutdown event: most likely killed with SIGKILL from outside uigniter (the host's OOM killer did not log it)`)
}

function describeStop (req: { step: string, graceMs: number }, app: { code?: number, signal?: number } | undefined, shutdown: { reason: string } | undefined): string {
  if (app?.code !== undefined) return `stopped on request: the app exited with code ${app.code}`
  if (app?.signal === constants.signals.SIGKILL) return `stopped on request: the app did not exit within ${req.graceMs} ms of SIGTERM and was killed (SIGKILL)`
  if (app?.signal !== undefined) return `stopped on request: the app ended by signal ${app.signal} (${signalName(app.signal)})`
  if (shutdown?.reason === 'host-qmp-quit') return `stopped on request: the guest did not shut down within ${req.graceMs} ms, so QEMU was told to quit`
  if (req.step === 'sigterm') return 'stopped on request: QEMU did not answer over QMP, so it was sent SIGTERM'
  if (req.step === 'sigkill') return 'stopped on request: QEMU answered neither QMP nor SIGTERM, so it was killed (SIGKILL)'
  return 'stopped on request'
}

function describeAppExit (app: { code?: number, signal?: number }): string {
  if (app.signal !== undefined) return `the app was killed by signal ${app.signal} (${signalName(app.signal)})`
  return `the app exited with code ${app.code ?? '?'}`
}

/** "SIGSEGV" for 11; the number itself when the host does not know it. */
export function signalName (n: number): string {
  return Object.entries(constants.signals).find(([, v]) => v === n)?.[0] ?? `signal ${n}`
}

function oneLine (text: string | undefined): string {
  const t = (text ?? '').trim().split('\n').slice(-3).join(' | ')
  return t === '' ? '' : `: ${t.length > 300 ? `…${t.slice(-300)}` : t}`
}
