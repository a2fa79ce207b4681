import assert from 'node:assert/strict'
import { test } from 'node:test'
import { ConsoleFacts } from '../../src/vmm/qemu/console-facts.js'
import { decideExit, type ExitEvidence } from '../../src/vmm/qemu/exit-reason.js'
import { checkHostResources } from '../../src/vmm/qemu/host-resources.js'
import { parseOomKill } from '../../src/vmm/qemu/oom-kill.js'
import { detectCgroupLayout } from '../../src/vmm/qemu/cgroup.js'
import { chooseJail, DEFAULT_JAIL } from '../../src/vmm/qemu/jail.js'
import { rejectsWith } from '../helpers/assertions.js'

const ran = { init: true }
const decide = (e: Partial<ExitEvidence>): ReturnType<typeof decideExit> => decideExit({ pid: 4242, console: ran, ...e })

test('exit reasons: the init\'s report first, then what uigniter asked, QEMU\'s SHUTDOWN reason, the status, the OOM record', () => {
  const at = new Date(0)
  const cases: Array<[Partial<ExitEvidence>, string, RegExp]> = [
    [{ console: { init: true, exit: { code: 3 } }, shutdown: { reason: 'guest-reset', guest: true } }, 'app-exited', /^the app exited with code 3$/],
    [{ console: { init: true, exit: { signal: 11 } } }, 'app-exited', /killed by signal 11 \(SIGSEGV\)/],
    [{ console: { init: true, execFailed: { errno: 2, error: 'No such file or directory' }, exit: { code: 127 } } }, 'exec-failed', /could not be started: No such file/],
    [{ requested: { kind: 'stop', step: 'guest', graceMs: 500 }, console: { init: true, exit: { code: 0 } } }, 'stopped', /app exited with code 0/],
    [{ requested: { kind: 'stop', step: 'quit', graceMs: 500 }, shutdown: { reason: 'host-qmp-quit', guest: false } }, 'stopped', /did not shut down within 500 ms, so QEMU was told to quit/],
    [{ requested: { kind: 'kill' }, status: { code: null, signal: 'SIGKILL' } }, 'killed', /on request/],
    [{ shutdown: { reason: 'host-qmp-quit', guest: false } }, 'stopped', /other than uigniter/],
    [{ shutdown: { reason: 'host-signal', guest: false } }, 'killed', /termination signal/],
    [{ shutdown: { reason: 'guest-reset', guest: true }, console: { init: true, panic: 'Kernel panic - not syncing: Attempted to kill init!' } }, 'crashed', /Kernel panic - not syncing: Attempted to kill init!/],
    [{ shutdown: { reason: 'guest-reset', guest: true }, console: { init: false, panic: 'Kernel panic - not syncing: VFS: Unable to mount root fs' } }, 'boot-failed', /VFS: Unable to mount root fs/],
    [{ console: { init: true, initFailed: 'mount shared directory uigniter0 on /data: No such device' }, shutdown: { reason: 'guest-reset', guest: true } }, 'boot-failed', /init failed: mount shared/],
    [{ status: { code: null, signal: 'SIGKILL' }, oomKill: 'Out of memory: Killed process 4242 (qemu-system-x86)' }, 'out-of-memory', /OOM killer killed QEMU \(pid 4242\)/],
    [{ status: { code: null, signal: 'SIGKILL' } }, 'killed', /killed by SIGKILL from outside uigniter/],
    [{ status: { code: null, signal: 'SIGSEGV' }, qemuLogTail: 'qemu: fatal' }, 'crashed', /crashed with SIGSEGV: qemu: fatal/],
    [{ status: { code: 1, signal: null }, qemuLogTail: 'qemu-system-x86_64: -drive: Could not open' }, 'crashed', /exited with code 1.*Could not open/],
    [{}, 'killed', /without a shutdown event: most likely killed with SIGKILL/],
    [{ foundDead: true }, 'died-while-daemon-down', /while the daemon was not running/],
    [{ foundDead: true, console: { init: true, exit: { code: 0 } } }, 'app-exited', /code 0/]
  ]
  for (const [evidence, reason, detail] of cases) {
    const exit = decide({ ...evidence, at })
    assert.equal(exit.reason, reason, JSON.stringify(evidence))
    assert.match(exit.detail, detail)
    assert.equal(exit.at, at.toISOString())
    assert.ok(!exit.detail.includes('\n'), 'one line')
  }
})

test('console facts: markers and the panic line, across chunk boundaries', () => {
  const facts = new ConsoleFacts()
  const markers = [
    ...facts.feed('[    0.8] Run /init as init process\r\nUIGNITER:INIT vers'),
    ...facts.feed('ion=1\r\nUIGNITER:APP-STARTED pid=27\r\nhello\r\nKernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\r\nUIGNITER:EXIT sig')
  ]
  assert.deepEqual(markers.map((m) => m.kind), ['init', 'app-started'])
  facts.feed('nal=9\n')
  assert.equal(facts.init, true)
  assert.equal(facts.appStartedPid, 27)
  assert.equal(facts.panic, 'Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009')
  assert.deepEqual(facts.exit, { signal: 9 })
})

test('OOM records: only the pid, and only after the process started', () => {
  const kmsg = [
    '3,100,5000000,-;Out of memory: Killed process 4242 (old-process) total-vm:100kB',
    '6,101,7000000,-;some other message',
    '3,102,9000000,-;Out of memory: Killed process 4242 (qemu-system-x86) total-vm:2000000kB, anon-rss:1000000kB',
    '3,103,9000001,-;Memory cgroup out of memory: Killed process 777 (other) total-vm:1kB'
  ].join('\n')
  assert.match(parseOomKill(kmsg, 4242, 8_000_000) ?? '', /qemu-system-x86/)
  assert.match(parseOomKill(kmsg, 777) ?? '', /Memory cgroup/)
  assert.equal(parseOomKill(kmsg, 4242, 9_500_000), undefined)
  assert.equal(parseOomKill(kmsg, 42), undefined)
})

test('host resources: vCPUs, memory and affinity are checked against the host', async () => {
  const host = { cpus: 2, memoryBytes: 1024 * 1048576 }
  checkHostResources({ vcpus: 2, memoryMiB: 1024, cpuAffinity: [0, 1] }, host)
  await rejectsWith(Promise.resolve().then(() => checkHostResources({ vcpus: 3, memoryMiB: 64 }, host)), 'UIG_ERR_VM_RESOURCES', '3 vCPUs asked', 'has 2 CPUs')
  await rejectsWith(Promise.resolve().then(() => checkHostResources({ vcpus: 1, memoryMiB: 1025 }, host)), 'UIG_ERR_VM_RESOURCES', '1025 MiB', '1024 MiB in all')
  await rejectsWith(Promise.resolve().then(() => checkHostResources({ vcpus: 1, memoryMiB: 64, cpuAffinity: [2] }, host)), 'UIG_ERR_VM_RESOURCES', 'CPUs 0 to 1')
})

test('a jailed QEMU killed in its own cgroup is out-of-memory, with its limit; a requested kill stays a kill', () => {
  const evidence: ExitEvidence = { pid: 99, console: { init: true }, status: { code: null, signal: 'SIGKILL' }, memoryLimitKill: { limitMiB: 160, memoryMiB: 64 } }
  const exit = decideExit(evidence)
  assert.equal(exit.reason, 'out-of-memory')
  assert.match(exit.detail, /memory limit of 160 MiB \(the guest's 64 MiB of RAM and 96 MiB for QEMU itself\)/)
  assert.match(exit.detail, /alone, in its cgroup/)
  assert.equal(decideExit({ ...evidence, requested: { kind: 'kill' } }).reason, 'killed')
  assert.equal(decideExit({ ...evidence, memoryLimitKill: undefined }).reason, 'killed')
})

test('cgroup layout: v1 when every controller has its own mount (this machine), v2 otherwise; none without either', async () => {
  const v1 = [
    'cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0',
    'cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0',
    'cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0',
    'cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0',
    'cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0',
    'cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0'
  ].join('\n')
  assert.deepEqual(await detectCgroupLayout(v1), { version: 1, mounts: { cpu: '/sys/fs/cgroup/cpu', cpuset: '/sys/fs/cgroup/cpuset', memory: '/sys/fs/cgroup/memory', pids: '/sys/fs/cgroup/pids' } })
  // A v2 mount whose cgroup.controllers cannot be read offers nothing.
  assert.equal(await detectCgroupLayout('cgroup2 /nonexistent cgroup2 rw 0 0'), undefined)
  assert.equal(await detectCgroupLayout('proc /proc proc rw 0 0'), undefined)
})

test('jail choice: auto jails as root on a bridge only; true without root is refused', async () => {
  const config = { enabled: 'auto' as const, ...DEFAULT_JAIL }
  assert.ok(chooseJail(config, { root: true, bridge: true }).jail !== undefined)
  assert.equal(chooseJail(config, { root: true, bridge: false }).jail, undefined)
  assert.match(chooseJail(config, { root: false, bridge: false }).reason, /not root/)
  assert.equal(chooseJail({ ...config, enabled: false }, { root: true, bridge: true }).jail, undefined)
  assert.ok(chooseJail({ ...config, enabled: true }, { root: true, bridge: false }).jail !== undefined)
  await rejectsWith(Promise.resolve().then(() => chooseJail({ ...config, enabled: true }, { root: false, bridge: true })), 'UIG_ERR_JAIL_SETUP', 'needs root')
})
