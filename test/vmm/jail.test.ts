import assert from 'node:assert/strict'
import { access, chmod, chown, mkdir, mkdtemp, readFile, readdir, readlink, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import { Template } from '../../src/snapshot/template.js'
import { chooseAccel } from '../../src/vmm/qemu/accel-probe.js'
import { freePort } from '../../src/core/free-port.js'
import { DEFAULT_JAIL, VMM_THREADS_CPUS, type JailOptions } from '../../src/vmm/qemu/jail.js'
import { QemuDriver } from '../../src/vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../../src/vmm/qemu/qemu-vm.js'
import { VmStateDir } from '../../src/vmm/qemu/vm-state-dir.js'
import { rejectsWith } from '../helpers/assertions.js'
import { createTestContext, type TestContext } from '../helpers/fixtures.js'
import { tcpRead } from '../helpers/tcp-read.js'
import { makeProbeRootfs } from './probe-app.js'
import { type Accel, type GuestLaunch, USER_NETWORK } from '../../src/core/ports/vmm-driver.js'

const root = process.getuid?.() === 0
const STOPS = { guestMarginMs: 3000, quitMs: 2000, termMs: 2000, killMs: 3000 }
/** A range of its own, so that this test's uids never meet a concurrently running daemon's. */
const JAIL: JailOptions = { ...DEFAULT_JAIL, uidBase: 700_000 + (process.pid % 1000) * 100, uidCount: 100, gid: 700_000 }

async function exists (path: string): Promise<boolean> {
  return await access(path).then(() => true, () => false)
}

/** The fields of /proc/PID/status that say what a process may do. */
async function procStatus (pid: number): Promise<Record<string, string>> {
  const text = await readFile(`/proc/${pid}/status`, 'utf8')
  return Object.fromEntries(text.split('\n').filter((l) => l.includes(':')).map((l) => [l.slice(0, l.indexOf(':')), l.slice(l.indexOf(':') + 1).trim()]))
}

async function consoleLine (vm: QemuVm, re: RegExp, timeoutMs = 60_000): Promise<string> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const line = (await vm.readConsole({ tailBytes: Infinity })).split('\n').map((l) => l.replace(/\r$/, '')).find((l) => re.test(l))
    if (line !== undefined) return line
    if (Date.now() > deadline) throw new Error(`no console line like ${re} within ${timeoutMs} ms:\n${(await vm.readConsole()).slice(-2000)}`)
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
}

describe('the QEMU jail: real VMs', { skip: root ? false : 'the jail needs root' }, () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let scratch: string
  let probe: ImageManifest
  let accel: Accel
  const driver = new QemuDriver({ livenessPollMs: 500, stopTimeouts: STOPS, jail: JAIL })
  const started: QemuVm[] = []
  let n = 0

  const launch = (over: Partial<GuestLaunch> = {}): GuestLaunch => ({
    manifest: probe,
    kernelPath: ctx.store.blobPath(probe.kernel.blob.digest),
    rootfsPath: ctx.store.blobPath(probe.rootfs?.digest ?? ''),
    accel,
    vcpus: 1,
    memoryMiB: 64,
    network: { mode: 'user', forwards: [] },
    guestNetwork: USER_NETWORK,
    hostname: 'probe',
    ...over
  })
  const start = async (over: Partial<GuestLaunch> = {}, options: { driver?: QemuDriver, cpuAffinity?: number[] } = {}): Promise<QemuVm> => {
    const id = `jvm${++n}`
    const vm = await (options.driver ?? driver).spawn({ id, stateDir: VmStateDir.of(ctx.dataDir, id).dir, launch: launch(over), ...(options.cpuAffinity !== undefined ? { cpuAffinity: options.cpuAffinity } : {}) })
    started.push(vm)
    return vm
  }
  const served = async (): Promise<{ port: number, over: Partial<GuestLaunch> }> => {
    const port = await freePort()
    return { port, over: { network: { mode: 'user', forwards: [{ hostAddress: '127.0.0.1', hostPort: port, guestPort: 8080 }] } } }
  }

  /** What every jailed QEMU must show in /proc. */
  const assertJailed = async (vm: QemuVm): Promise<number> => {
    const status = await procStatus(vm.pid)
    const uids = (status.Uid ?? '').split(/\s+/).map(Number)
    assert.equal(uids.length, 4)
    assert.ok(uids.every((u) => u === uids[0] && u !== 0), `real, effective, saved and fs uid are one non-root uid: ${status.Uid}`)
    assert.ok((status.Gid ?? '').split(/\s+/).every((g) => Number(g) === JAIL.gid), `gid ${status.Gid}`)
    assert.equal(status.Groups, String(JAIL.gid), 'no supplementary groups but the jail\'s')
    assert.equal(status.Seccomp, '2', 'seccomp filter mode')
    assert.equal(status.CapEff, '0000000000000000', 'no effective capabilities')
    assert.equal(status.CapPrm, '0000000000000000', 'no permitted capabilities')
    assert.equal(status.NoNewPrivs, '1')
    const jailRoot = new VmStateDir(vm.stateDir).rootDir
    assert.equal(await readlink(`/proc/${vm.pid}/root`), jailRoot, 'its root is its jail')
    assert.deepEqual(await readdir(jailRoot), [], 'the jail is empty: QEMU opened everything before it chrooted')
    assert.equal(vm.launch.jail?.uid, uids[0])
    return uids[0] ?? 0
  }

  before(async () => {
    ctx = await createTestContext()
    scratch = await mkdtemp(join(tmpdir(), 'uigniter-jail-'))
    const rootfs = await makeProbeRootfs(scratch)
    probe = await ctx.builder.build({ name: 'probe', source: { kind: 'rootfs', dir: rootfs, entrypoint: '/bin/probe', args: ['serve'] }, format: 'squashfs' })
    accel = (await chooseAccel(ctx.config, ctx.store.blobPath(probe.kernel.blob.digest), probe.kernel.blob.digest)).accel
  })
  after(async () => {
    for (const vm of started) vm.kill()
    await Promise.all(started.map(async (vm) => await Promise.race([vm.exited, new Promise((resolve) => setTimeout(resolve, 3000))])))
    await ctx.cleanup()
    await rm(scratch, { recursive: true, force: true })
  })

  test('every jailed QEMU: its own non-root uid, seccomp, no capabilities, its jail as its root, its cgroup with the limits; it serves; the cgroup goes with it', { timeout: 180_000 }, async () => {
    const a = await served()
    const b = await served()
    const one = await start({ ...a.over, memoryMiB: 64 }, { cpuAffinity: [0] })
    const two = await start({ ...b.over, memoryMiB: 96 })
    const uids = [await assertJailed(one), await assertJailed(two)]
    assert.notEqual(uids[0], uids[1], 'two VMs never share a uid')
    await consoleLine(one, /^probe: ready/)
    await consoleLine(two, /^probe: ready/)
    assert.equal(await tcpRead(a.port, 30_000, 200), 'probe\n')
    assert.equal(await tcpRead(b.port, 30_000, 200), 'probe\n')

    for (const [vm, memoryMiB, cpuset] of [[one, 64, '0'], [two, 96, (await readFile('/sys/fs/cgroup/cpuset/cpuset.cpus', 'utf8').catch(async () => await readFile('/sys/fs/cgroup/cpuset.cpus.effective', 'utf8'))).trim()]] as const) {
      const cgroup = vm.cgroup
      assert.ok(cgroup !== undefined, 'a jailed VM has a cgroup')
      const limits = await cgroup.readLimits()
      assert.equal(limits.cpuQuotaUs, (1 + VMM_THREADS_CPUS) * limits.cpuPeriodUs, 'one vCPU, and a CPU for QEMU\'s own threads')
      assert.equal(limits.cpuset, cpuset)
      assert.equal(limits.memoryBytes, (memoryMiB + JAIL.memoryOverheadMiB) * 1024 * 1024)
      assert.equal(limits.pidsMax, JAIL.pidsMax)
      assert.deepEqual(await cgroup.pids(), [vm.pid], 'QEMU and nothing else is in it')
      const procCgroups = await readFile(`/proc/${vm.pid}/cgroup`, 'utf8')
      for (const dir of cgroup.record.dirs) assert.ok(procCgroups.includes(dir.slice(dir.indexOf('/uigniter/'))), `QEMU is in ${dir}`)
      assert.deepEqual(vm.launch.jail?.cgroup, cgroup.record, 'launch.json records the cgroup')
    }

    const dirs = [...one.cgroup?.record.dirs ?? [], ...two.cgroup?.record.dirs ?? []]
    assert.equal((await one.stop({ graceMs: 5000 })).appExitCode, 0)
    assert.equal((await two.stop({ graceMs: 5000 })).appExitCode, 0)
    for (const dir of dirs) assert.equal(await exists(dir), false, `${dir} is removed`)
  })

  test('adoption after a daemon restart: the jailed VM and its cgroup are found again from the state directory', { timeout: 120_000 }, async () => {
    const vm = await start()
    await consoleLine(vm, /^probe: ready/)
    vm.close()
    const restarted = new QemuDriver({ livenessPollMs: 500, stopTimeouts: STOPS, jail: JAIL })
    const adopted = await restarted.adopt(vm.stateDir)
    assert.ok(!('dead' in adopted))
    await assertJailed(adopted)
    assert.deepEqual(adopted.cgroup?.record, vm.cgroup?.record)
    process.kill(adopted.pid, 'SIGKILL')
    const exit = await adopted.exited
    assert.equal(exit.reason, 'killed', exit.detail)
    for (const dir of vm.cgroup?.record.dirs ?? []) assert.equal(await exists(dir), false, `${dir} is removed`)
  })

  test('a template and its clones under the jail: the state goes out over a socket in the chroot and comes back in as an inherited fd', { timeout: 180_000 }, async () => {
    const template = await Template.create(driver, { id: 'jailed', dataDir: ctx.dataDir, launch: launch() })
    assert.ok((await readFile(template.record.statePath)).length > 1000, 'the state file was written')
    const clones = []
    for (const i of [1, 2]) {
      const port = await freePort()
      const id = `jclone${i}`
      const { vm } = await template.clone(driver, {
        id,
        stateDir: VmStateDir.of(ctx.dataDir, id).dir,
        network: { mode: 'user', forwards: [{ hostAddress: '127.0.0.1', hostPort: port, guestPort: 8080 }] },
        guestNetwork: { ...USER_NETWORK, address: `10.0.2.${20 + i}` },
        hostname: id
      })
      started.push(vm)
      clones.push({ vm, port })
    }
    const uids = new Set<number>()
    for (const { vm, port } of clones) {
      uids.add(await assertJailed(vm))
      await consoleLine(vm, /^probe: ready/)
      assert.equal(await tcpRead(port, 30_000, 200), 'probe\n')
    }
    assert.equal(uids.size, 2)
    for (const { vm } of clones) vm.kill()
    for (const { vm } of clones) await vm.exited
    await template.remove()
  })

  test('a 9p share cannot be escaped with .. or symlinks, and is used as the jail\'s group', { timeout: 120_000 }, async () => {
    // The secret sits beside the shares, readable by root alone; the victim is writable by anyone.
    const secret = join(scratch, 'jail-secret.txt')
    const victim = join(scratch, 'victim.txt')
    await writeFile(secret, 'host secret\n', { mode: 0o600 })
    await writeFile(victim, 'untouched\n', { mode: 0o666 })
    await chmod(victim, 0o666)
    const ro = join(scratch, 'jail-ro')
    const rw = join(scratch, 'jail-rw')
    await mkdir(ro, { recursive: true })
    await mkdir(rw, { recursive: true })
    await writeFile(join(ro, 'hello.txt'), 'hello from the host\n')
    await symlink('../jail-secret.txt', join(rw, 'rel-link'))
    await symlink(secret, join(rw, 'abs-link'))
    await symlink('../victim.txt', join(rw, 'victim-link'))
    const shares = [{ hostPath: ro, guestPath: '/data/ro', readOnly: true }, { hostPath: rw, guestPath: '/data/rw', readOnly: false }]

    // Refused until the jail's group may use the shares (QEMU opens a share's top directory as root, the rest as the VM's uid).
    await rejectsWith(start({ appArgs: ['escape'], shares }), 'UIG_ERR_VM_SHARE_INVALID', `group ${JAIL.gid}`)
    for (const dir of [ro, rw]) {
      await chown(dir, 0, JAIL.gid)
      await chmod(dir, dir === rw ? 0o770 : 0o750)
    }
    const vm = await start({ appArgs: ['escape'], shares })
    const exit = await vm.exited
    const text = await vm.readConsole({ tailBytes: Infinity })
    assert.equal(exit.reason, 'app-exited', `${exit.detail}\n${text}`)
    assert.match(text, /probe: escape done/)
    assert.doesNotMatch(text, /host secret/, 'nothing outside the share was read')
    assert.match(text, /probe: dotdot read errno=2\b/)
    assert.match(text, /probe: dotdot-deep read errno=2\b/)
    assert.match(text, /probe: host-rel-link read errno=2\b/, 'the guest resolves a host symlink in its own tree')
    assert.match(text, /probe: host-abs-link read errno=2\b/)
    assert.match(text, /probe: guest-up-link read errno=2\b/)
    assert.match(text, /probe: ro-share read=hello from the host/)
    // Writing within the share works as the VM's uid (QEMU's 9p chmods through /proc/self/fd, which the chroot lacks: see docs/jail.md).
    assert.match(text, /probe: rw-direct write ok=1/)
    assert.match(text, /probe: guest-root-link write ok=1/, 'a symlink to / is the guest\'s own root, so this lands in the share')
    assert.match(text, /probe: escape mkdir=0\b/)
    assert.equal(await readFile(join(rw, 'direct.txt'), 'utf8'), 'written by the guest\n')
    assert.equal(await readFile(join(rw, 'through-root.txt'), 'utf8'), 'written by the guest\n')
    assert.equal(await readFile(victim, 'utf8'), 'untouched\n', 'no write went through a symlink to the host')
    assert.equal(await readFile(secret, 'utf8'), 'host secret\n')
    // What the guest made stays in the share: symlinks as symlinks, files owned by the VM's uid.
    assert.equal(await readlink(join(rw, 'up')), '../../../../..')
    assert.equal(await readlink(join(rw, 'to-root')), '/')
    assert.equal(await exists(join(new VmStateDir(vm.stateDir).rootDir, 'proc', 'self')), false, 'the jail\'s procfs is unmounted when the VM ends')
    assert.ok(!(await readdir(scratch)).some((f) => !['jail-secret.txt', 'victim.txt', 'jail-ro', 'jail-rw', 'probe-root', 'probe.c'].includes(f)), 'nothing new beside the shares')
  })

  test('a QEMU over its memory limit dies alone, and its VM is reported out-of-memory', { timeout: 180_000 }, async () => {
    const bystander = await served()
    const other = await start(bystander.over)
    await consoleLine(other, /^probe: ready/)
    // No overhead allowed: a guest that touches most of its RAM puts QEMU over the limit.
    const tight = new QemuDriver({ livenessPollMs: 500, stopTimeouts: STOPS, jail: { ...JAIL, memoryOverheadMiB: 0 } })
    const hog = await start({ appArgs: ['eat', '224'], memoryMiB: 256 }, { driver: tight })
    const dirs = hog.cgroup?.record.dirs ?? []
    const exit = await hog.exited
    assert.equal(exit.reason, 'out-of-memory', `${exit.detail}\n${(await hog.readConsole()).slice(-1500)}`)
    assert.match(exit.detail, /memory limit of 256 MiB/)
    for (const dir of dirs) assert.equal(await exists(dir), false, `${dir} is removed`)
    // The other VM did not notice.
    assert.equal((await other.status()).status, 'running')
    assert.equal(await tcpRead(bystander.port, 30_000, 200), 'probe\n')
    assert.equal((await other.stop({ graceMs: 5000 })).appExitCode, 0)
  })
})
