import type { QmpEvent } from './qmp-client.js'

/** The migrate-incoming URI of the state file a clone's QEMU inherits (QemuDriver opens it as fd 3). */
export const INCOMING_STATE_URI = 'fd:3'

/** Where a template's migration stream goes (QemuVm.openMigrationSink). */
export interface MigrationSink {
  /** For QMP `migrate`. */
  uri: string
  /** Settles once the whole stream is in the file. */
  written: Promise<void>
  close: () => void
}

/** What the migration helpers need of a QemuVm: its monitor and its QMP events. */
export interface MigratingVm {
  monitor: <T = unknown>(command: string, args?: Record<string, unknown>, options?: { timeoutMs?: number }) => Promise<T>
  pause: () => Promise<void>
  resume: () => Promise<void>
  openMigrationSink: (path: string) => Promise<MigrationSink>
  on: (event: 'event', listener: (e: QmpEvent) => void) => unknown
  off: (event: 'event', listener: (e: QmpEvent) => void) => unknown
  readonly exited: Promise<unknown>
}

/**
 * Both ends turn on QMP's `events` capability, so that QEMU announces every
 * migration state change (`MIGRATION`); `x-ignore-shared` leaves the RAM in
 * the shared file (design.md fact 5).
 */
const CAPABILITIES = [{ capability: 'x-ignore-shared', state: true }, { capability: 'events', state: true }]

/**
 * Pauses the guest and saves its device state to `statePath`. QEMU 7.2 has
 * no file: transport and a jailed QEMU may not exec (spawn=deny), so the
 * stream goes over a unix socket to this process, which writes the file.
 */
export async function saveState (vm: MigratingVm, statePath: string, timeoutMs: number): Promise<void> {
  await vm.pause()
  await vm.monitor('migrate-set-capabilities', { capabilities: CAPABILITIES })
  const sink = await vm.openMigrationSink(statePath)
  try {
    const done = migrationDone(vm, timeoutMs)
    await vm.monitor('migrate', { uri: sink.uri })
    await done
    await withTimeout(sink.written, 10_000, 'the migration stream did not end within 10 s of completing')
  } finally {
    sink.close()
  }
}

/** Restores the state a clone's QEMU was spawned with (`-incoming defer`) and runs the guest. */
export async function restoreState (vm: MigratingVm, timeoutMs: number): Promise<void> {
  await vm.monitor('migrate-set-capabilities', { capabilities: CAPABILITIES })
  const done = migrationDone(vm, timeoutMs)
  await vm.monitor('migrate-incoming', { uri: INCOMING_STATE_URI })
  await done
  // Without -S QEMU resumes by itself once the state is in; `cont` on a running guest is harmless.
  const { status } = await vm.monitor<{ status: string }>('query-status')
  if (status !== 'running') await vm.resume()
}

/**
 * Settles on QEMU's MIGRATION event: `completed` resolves, `failed` or
 * `cancelled` rejects, as does the VM's end or the deadline. Subscribed
 * before the command that starts the migration, so no event is missed.
 */
async function migrationDone (vm: MigratingVm, timeoutMs: number): Promise<void> {
  let listener: ((e: QmpEvent) => void) | undefined
  let timer: NodeJS.Timeout | undefined
  let last = 'none'
  try {
    await Promise.race([
      new Promise<void>((resolve, reject) => {
        listener = (e) => {
          if (e.event !== 'MIGRATION') return
          last = typeof e.data.status === 'string' ? e.data.status : 'unknown'
          if (last === 'completed') resolve()
          else if (last === 'failed' || last === 'cancelled') reject(new Error(`the migration ${last}`))
        }
        vm.on('event', listener)
      }),
      vm.exited.then(() => { throw new Error('QEMU ended during the migration') }),
      new Promise<never>((resolve, reject) => { timer = setTimeout(() => reject(new Error(`the migration did not complete within ${timeoutMs} ms (last status ${last})`)), timeoutMs) })
    ])
  } finally {
    if (listener !== undefined) vm.off('event', listener)
    clearTimeout(timer)
  }
}

async function withTimeout<T> (promise: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([promise, new Promise<never>((resolve, reject) => { timer = setTimeout(() => reject(new Error(message)), ms) })])
  } finally {
    clearTimeout(timer)
  }
}
