import assert from 'node:assert/strict'
import { access, mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises'
import { cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import { chooseAccel } from '../../src/vmm/qemu/accel-probe.js'
import { freePort } from '../../src/core/free-port.js'
import { QemuDriver } from '../../src/vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../../src/vmm/qemu/qemu-vm.js'
import type { QmpEvent } from '../../src/vmm/qemu/qmp-client.js'
import { VmStateDir } from '../../src/vmm/qemu/vm-state-dir.js'
import { rejectsWith } from '../helpers/assertions.js'
import { createTestContext, type TestContext } from '../helpers/fixtures.js'
import { makeProbeRootfs } from './probe-app.js'
import { tcpRead } from '../helpers/tcp-read.js'
import { type Accel, type GuestLaunch, USER_NETWORK } from '../../src/core/ports/vmm-driver.js'

/** Resolves once the console has a line matching `re` (the whole console so far included). */
async function consoleLine (vm: QemuVm, re: RegExp, timeoutMs = 60_000): Promise<string> {
  return await new Promise((resolve, reject) => {
    let text = ''
    const timer = setTimeout(() => { stop(); reject(new Error(`no console line like ${re} within ${timeoutMs} ms; console:\n${text.slice(-2000)}`)) }, timeoutMs)
    const stop = vm.followConsole((chunk) => {
      text += chunk
      // Whole lines only; the serial tty ends them with \r\n.
      const line = text.split('\n').slice(0, -1).map((l) => l.replace(/\r$/, '')).find((l) => re.test(l))
      if (line !== undefined) { clearTimeout(timer); stop(); resolve(line) }
    }, { tailBytes: Infinity, onEnd: () => { clearTimeout(timer); reject(new Error(`the VM ended before a console line like ${re}; console:\n${text.slice(-2000)}`)) } })
  })
}

async function exists (path: string): Promise<boolean> {
  return await access(path).then(() => true, () => false)
}

describe('QEMU driver: real VMs', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let scratch: string
  let probe: ImageManifest
  let accel: Accel
  const driver = new QemuDriver({ livenessPollMs: 500, stopTimeouts: { guestMarginMs: 3000, quitMs: 2000, termMs: 2000, killMs: 3000 } })
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
  const stateDirOf = (id: string): string => VmStateDir.of(ctx.dataDir, id).dir
  const start = async (over: Partial<GuestLaunch> = {}, options: { driver?: QemuDriver, cpuAffinity?: number[] } = {}): Promise<QemuVm> => {
    const id = `vm${++n}`
    const vm = await (options.driver ?? driver).spawn({ id, stateDir: stateDirOf(id), launch: launch(over), cpuAffinity: options.cpuAffinity })
    started.push(vm)
    return vm
  }

  before(async () => {
    ctx = await createTestContext()
    scratch = await mkdtemp(join(tmpdir(), 'uigniter-vmm-'))
    const root = await makeProbeRootfs(scratch)
    // squashfs: a read-only root disk, as large images have, so that the overlay matters.
    probe = await ctx.builder.build({ name: 'probe', source: { kind: 'rootfs', dir: root, entrypoint: '/bin/probe', args: ['serve'] }, format: 'squashfs', env: { FOO: 'from-image', BAR: 'kept' } })
    accel = (await chooseAccel(ctx.config, ctx.store.blobPath(probe.kernel.blob.digest), probe.kernel.blob.digest)).accel
  })
  after(async () => {
    for (const vm of started) { vm.kill() }
    await Promise.all(started.map(async (vm) => await Promise.race([vm.exited, new Promise((resolve) => setTimeout(resolve, 3000))])))
    await ctx.cleanup()
    await rm(scratch, { recursive: true, force: true })
  })

  test('start: detached QEMU, its state directory, QMP pause/resume, per-VM args and env, port forward; a graceful stop', async () => {
    const port = await freePort()
    const vm = await start({
      network: { mode: 'user', forwards: [{ hostAddress: '127.0.0.1', hostPort: port, guestPort: 8080 }] },
      appArgs: ['serve', 'two words', 'x:y%z'],
      appEnv: { FOO: 'per vm "quoted"' }
    }, { cpuAffinity: [0] })
    const dir = new VmStateDir(vm.stateDir)
    assert.equal(await dir.readPid(), vm.pid)
    // Its own session: the daemon's terminal and process group signals do not reach it.
    const stat0 = await readFile(`/proc/${vm.pid}/stat`, 'utf8')
    assert.equal(Number(stat0.slice(stat0.lastIndexOf(')') + 2).split(' ')[3]), vm.pid, 'QEMU leads its own session')
    const record = await dir.readLaunch()
    assert.deepEqual(record.argv, vm.launch.argv)
    assert.ok(record.argv.includes('-pidfile'))
    assert.ok(record.argv.some((a) => a.includes(`logfile=${dir.consoleLog},logappend=on`)))
    assert.deepEqual(record.cpuAffinity, [0])
    for (const file of ['launch.json', 'qemu.pid', 'qmp.sock', 'ctl.sock', 'console.log', 'qemu.log']) {
      assert.ok(await exists(join(vm.stateDir, file)), `${file} in the state directory`)
    }
    // Affinity: every QEMU thread on CPU 0.
    for (const tid of await readdir(`/proc/${vm.pid}/task`)) {
      const status = await readFile(`/proc/${vm.pid}/task/${tid}/status`, 'utf8')
      assert.match(status, /^Cpus_allowed_list:\s*0$/m, `thread ${tid} pinned`)
    }

    assert.equal(await consoleLine(vm, /^probe: argc=/), 'probe: argc=4 [serve] [two words] [x:y%z]')
    assert.equal(await consoleLine(vm, /^probe: FOO=/), 'probe: FOO=[per vm "quoted"] BAR=[kept]')
    await consoleLine(vm, /^probe: ready/)
    assert.equal(await tcpRead(port, 30_000, 200), 'probe\n')

    const events: string[] = []
    vm.on('event', (e: QmpEvent) => events.push(e.event))
    await vm.pause()
    assert.deepEqual(await vm.status(), { running: false, status: 'paused' })
    await vm.resume()
    assert.equal((await vm.status()).status, 'running')
    assert.deepEqual(events, ['STOP', 'RESUME'])

    const exit = await vm.stop({ graceMs: 5000 })
    assert.equal(exit.reason, 'stopped', exit.detail)
    assert.equal(exit.appExitCode, 0)
    assert.match(exit.detail, /exited with code 0/)
    assert.deepEqual(await vm.exited, exit)
    assert.deepEqual(await vm.stop(), exit, 'stop is idempotent')
    assert.match(await vm.readConsole(), /probe: stopping on SIGTERM/)
    assert.deepEqual(await dir.readExit(), exit, 'the exit is recorded in the state directory')
    assert.equal(await dir.readPid(), undefined, 'QEMU removed its pidfile on a clean exit')
    await rejectsWith(vm.pause(), 'UIG_ERR_VM_INVALID_STATE', 'ended')
  })

  test('an app that ignores SIGTERM is killed after the grace period', async () => {
    const vm = await start({ appArgs: ['ignore-term'] })
    await consoleLine(vm, /^probe: ready/)
    const begun = Date.now()
    const exit = await vm.stop({ graceMs: 1000 })
    assert.equal(exit.reason, 'stopped', exit.detail)
    assert.equal(exit.appSignal, 9)
    assert.match(exit.detail, /did not exit within 1000 ms of SIGTERM and was killed \(SIGKILL\)/)
    assert.ok(Date.now() - begun >= 1000)
  })

  test('a QEMU that answers nothing (SIGSTOP) is escalated to QMP quit, SIGTERM, then SIGKILL', async () => {
    const vm = await start({ appArgs: ['serve'] })
    await consoleLine(vm, /^probe: ready/)
    process.kill(vm.pid, 'SIGSTOP')
    const exit = await vm.stop({ graceMs: 500 })
    assert.equal(exit.reason, 'stopped', exit.detail)
    assert.match(exit.detail, /killed \(SIGKILL\)/)
  })

  test('kill -9 of QEMU from outside is noticed and reported as killed', async () => {
    const vm = await start()
    await consoleLine(vm, /^probe: ready/)
    process.kill(vm.pid, 'SIGKILL')
    const exit = await vm.exited
    assert.equal(exit.reason, 'killed')
    assert.match(exit.detail, new RegExp(`QEMU \\(pid ${vm.pid}\\) was killed by SIGKILL from outside uigniter`))
  })

  test('the app\'s own exit code comes back; kill() is reported as killed on request', async () => {
    const exited = await start({ appArgs: ['exit', '7'] })
    const exit = await exited.exited
    assert.deepEqual([exit.reason, exit.appExitCode, exit.detail], ['app-exited', 7, 'the app exited with code 7'])
    const killed = await start()
    killed.kill()
    assert.equal((await killed.exited).reason, 'killed')
    assert.match((await killed.exited).detail, /on request/)
  })

  test('adoption after a daemon restart: found again by its pidfile, stopped, its exit detected; kill -9 of an adopted VM', async () => {
    const vm = await start()
    await consoleLine(vm, /^probe: ready/)
    const { pid, stateDir } = vm
    vm.close()

    const adopted = await driver.adopt(stateDir)
    assert.ok(!('dead' in adopted), 'a running VM is adopted')
    assert.equal(adopted.pid, pid)
    assert.equal((await adopted.status()).status, 'running')
    assert.match(await adopted.readConsole(), /probe: ready/)
    const exit = await adopted.stop({ graceMs: 5000 })
    assert.equal(exit.reason, 'stopped', exit.detail)
    assert.equal(exit.appExitCode, 0)
    const again = await driver.adopt(stateDir)
    assert.ok('dead' in again)
    assert.deepEqual(again.exit, exit, 'an ended VM stays ended')

    // kill -9 of a VM that this process did not spawn: no exit status, only QMP closing.
    const other = await start()
    await consoleLine(other, /^probe: ready/)
    other.close()
    const adopted2 = await driver.adopt(other.stateDir)
    assert.ok(!('dead' in adopted2))
    process.kill(adopted2.pid, 'SIGKILL')
    const killed = await adopted2.exited
    assert.equal(killed.reason, 'killed')
    assert.match(killed.detail, /without a shutdown event.*SIGKILL/)
  })

  test('adoption of a VM that died while the daemon was down; a recycled pid is never adopted', async () => {
    const vm = await start()
    await consoleLine(vm, /^probe: ready/)
    vm.close()
    process.kill(vm.pid, 'SIGKILL')
    const dir = new VmStateDir(vm.stateDir)
    while (await readFile(`/proc/${vm.pid}/stat`, 'utf8').then((s) => !/\) [ZX] /.test(s), () => false)) {
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
    const found = await driver.adopt(vm.stateDir)
    assert.ok('dead' in found)
    assert.equal(found.exit.reason, 'died-while-daemon-down')
    assert.match(found.exit.detail, new RegExp(`pid ${vm.pid}`))

    // The pidfile now names some other live process (ours): it must not be taken for the VM.
    await rm(dir.exitFile)
    await writeFile(dir.pidFile, `${process.pid}\n`)
    const recycled = await driver.adopt(vm.stateDir)
    assert.ok('dead' in recycled)
    assert.equal(recycled.exit.reason, 'died-while-daemon-down')
  })

  test('9p shares are readable and read-only by default; an overlay makes the root writable and goes with the VM', async () => {
    const ro = join(scratch, 'share-ro')
    const rw = join(scratch, 'share-rw')
    await mkdir(ro, { recursive: true })
    await mkdir(rw, { recursive: true })
    await writeFile(join(ro, 'hello.txt'), 'hello from the host\n')
    const shares = [{ hostPath: ro, guestPath: '/data/ro', readOnly: true }, { hostPath: rw, guestPath: '/data/rw', readOnly: false }]

    const withOverlay = await start({ appArgs: ['check'], shares, overlaySizeMiB: 32 })
    assert.ok((await stat(join(withOverlay.stateDir, 'overlay.img'))).size === 32 * 1024 * 1024)
    const exit = await withOverlay.exited
    const text = await withOverlay.readConsole()
    assert.equal(exit.reason, 'app-exited', `${exit.detail}\n${text}`)
    assert.match(text, /probe: ro-share read=hello from the host/)
    assert.match(text, /probe: ro-share write errno=30\b/, 'EROFS on the read-only share')
    assert.match(text, /probe: rw-share write ok=1/)
    assert.equal(await readFile(join(rw, 'from-guest.txt'), 'utf8'), 'written by the guest\n')
    assert.match(text, /probe: root write ok=1/)
    assert.match(text, /probe: root read=written by the guest/)
    await driver.remove(withOverlay.stateDir)
    assert.equal(await exists(withOverlay.stateDir), false, 'the state directory and its overlay are gone')

    const without = await start({ appArgs: ['check'], shares: [shares[0]!] })
    await without.exited
    assert.match(await without.readConsole(), /probe: root write errno=30\b/, 'without an overlay the root is read-only')

    // A share the init cannot mount (no such mount point on a read-only root) stops the VM before the app.
    const broken = await start({ shares: [{ hostPath: ro, guestPath: '/nowhere', readOnly: true }] })
    const failed = await broken.exited
    assert.equal(failed.reason, 'boot-failed', failed.detail)
    assert.match(failed.detail, /init failed: mount shared directory uigniter0 on \/nowhere/)
  })

  test('remove refuses a running VM', async () => {
    const vm = await start()
    await rejectsWith(driver.remove(vm.stateDir), 'UIG_ERR_VM_INVALID_STATE', 'still running')
    vm.kill()
    await vm.exited
    await driver.remove(vm.stateDir)
  })

  test('the console log stays within its bound, keeps the newest output, and followers see it across rotations', async () => {
    const small = new QemuDriver({ consoleLimitBytes: 64 * 1024, rotateIntervalMs: 100 })
    const vm = await start({ appArgs: ['flood', '4000'] }, { driver: small })
    let followed = ''
    const stop = vm.followConsole((t) => { followed += t }, { tailBytes: Infinity })
    await consoleLine(vm, /^probe: ready/, 120_000)
    // One more check after the flood: the timer rotates at most 100 ms later.
    await new Promise((resolve) => setTimeout(resolve, 400))
    const log = (await stat(join(vm.stateDir, 'console.log'))).size
    const previous = (await stat(join(vm.stateDir, 'console.log.1'))).size
    assert.ok(log <= 64 * 1024, `console.log is ${log} bytes`)
    assert.ok(previous <= 64 * 1024, `console.log.1 is ${previous} bytes`)
    const tail = await vm.readConsole({ tailBytes: 4096 })
    assert.match(tail, /probe: flood 003999/)
    assert.match(tail, /probe: ready/)
    // Every line reached the follower but for those QEMU wrote in a copy-to-truncate instant.
    const seen = new Set([...followed.matchAll(/probe: flood (\d{6})/g)].map((m) => m[1]))
    assert.ok(seen.size >= 3980, `the follower saw ${seen.size} of 4000 lines`)
    stop()
    const exit = await vm.stop({ graceMs: 3000 })
    assert.equal(exit.appExitCode, 0, exit.detail)
  })

  test('resources beyond the host, bad shares and an over-long command line are refused before anything starts', async () => {
    const id = 'refused'
    const tryStart = async (over: Partial<GuestLaunch>, cpuAffinity?: number[]): Promise<QemuVm> =>
      await driver.spawn({ id, stateDir: stateDirOf(id), launch: launch(over), cpuAffinity })
    await rejectsWith(tryStart({ vcpus: cpus().length + 1 }), 'UIG_ERR_VM_RESOURCES', `${cpus().length + 1} vCPUs`, `${cpus().length} CPUs`)
    const hostMiB = Math.floor(totalmem() / 1048576)
    await rejectsWith(tryStart({ memoryMiB: hostMiB + 1 }), 'UIG_ERR_VM_RESOURCES', `${hostMiB + 1} MiB`, `${hostMiB} MiB`)
    await rejectsWith(tryStart({}, [cpus().length]), 'UIG_ERR_VM_RESOURCES', 'CPU affinity')
    await rejectsWith(tryStart({ shares: [{ hostPath: join(scratch, 'nope'), guestPath: '/data/ro', readOnly: true }] }), 'UIG_ERR_VM_SHARE_INVALID', 'does not exist')
    await rejectsWith(tryStart({ appArgs: Array.from({ length: 40 }, () => 'x'.repeat(60)) }), 'UIG_ERR_VM_CMDLINE_INVALID', '2047')
    assert.equal(await exists(stateDirOf(id)), false, 'no state directory was made')
  })
})
