import assert from 'node:assert/strict'
import { execFile } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { chmod, chown, copyFile, lchown, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import type { ImageManifest } from '../../src/core/image.js'
import type { Accel, GuestLaunch, GuestVolume } from '../../src/core/ports/vmm-driver.js'
import { chooseAccel } from '../../src/vmm/qemu/accel-probe.js'
import { DEFAULT_JAIL, type JailOptions } from '../../src/vmm/qemu/jail.js'
import { QemuDriver } from '../../src/vmm/qemu/qemu-driver.js'
import type { QemuVm } from '../../src/vmm/qemu/qemu-vm.js'
import { VmStateDir } from '../../src/vmm/qemu/vm-state-dir.js'
import { rejectsWith } from '../helpers/assertions.js'
import { BUSYBOX } from '../helpers/busybox-guests.js'
import { consoleLine, consoleLines as lines } from '../helpers/guest-console.js'
import { createTestContext, type TestContext } from '../helpers/fixtures.js'

/**
 * Persistent volumes from the QEMU driver down to the guest's mount: a raw
 * file holding ext4 on the host, a virtio disk in the guest, mounted by our
 * init at its path. Two boots: one whose QEMU is killed (a power cut) after
 * the app fsynced, one that mounts the same volume again and is stopped
 * gracefully. Jailed when run as root, so that the jail's uid change is
 * shown not to need a chown of the volume files.
 */

const root = process.getuid?.() === 0
/** A range of its own, so that this test's uids never meet a concurrently running daemon's. */
const JAIL: JailOptions = { ...DEFAULT_JAIL, uidBase: 710_000 + (process.pid % 1000) * 100, uidCount: 100, gid: 710_000 }
const STOPS = { guestMarginMs: 3000, quitMs: 2000, termMs: 2000, killMs: 3000 }
const PAYLOAD = 'fsynced before the power cut'
/** More than a 4 MiB volume holds, and incompressible, so that the image's disk keeps all of it. */
const BIG = randomBytes(6 * 1024 * 1024)

/**
 * The app, by $MODE. `crash`: writes and fsyncs a file in the volume (busybox
 * `sync FILE` is fsync(FILE)), tries to write into the read-only volume, then
 * waits to be killed. `again`: prints what it finds, writes another file
 * without any sync, and waits to be stopped.
 */
const APP = `#!/bin/busybox sh
export PATH=/bin
case "$MODE" in
crash)
  echo "$PAYLOAD" > /data/a.txt && busybox sync /data/a.txt && echo UIG-SYNCED
  if echo x 2>/tmp/err > /ro/x; then echo "UIG-RO wrote"; else echo "UIG-RO refused: $(busybox cat /tmp/err)"; fi
  echo "UIG-RO-READ $(busybox cat /ro/hello.txt)"
  echo "UIG-MOUNT $(busybox grep ' /data ' /proc/mounts)"
  echo "UIG-MOUNT $(busybox grep ' /ro ' /proc/mounts)"
  dev=$(busybox grep ' /data ' /proc/mounts | busybox cut -d' ' -f1)
  echo "UIG-CACHE $(busybox cat /sys/block/\${dev#/dev/}/queue/write_cache)"
  echo UIG-READY
  exec busybox sleep 3600
  ;;
again)
  echo "UIG-AGAIN $(busybox cat /data/a.txt)"
  echo second boot > /data/b.txt
  echo UIG-READY
  exec busybox sleep 3600
  ;;
copyup)
  for f in /web /web/index.html /web/sub /web/sub/deep.txt /web/link; do echo "UIG-STAT $(busybox stat -c '%n %u %g %a %F' $f)"; done
  echo "UIG-LINK $(busybox readlink /web/link)"
  echo "UIG-CAT $(busybox cat /web/index.html)"
  echo "UIG-LS $(busybox ls -a /web | busybox tr '\n' ' ')"
  busybox rm /web/index.html && echo mine > /web/mine.txt && busybox sync /web/mine.txt
  echo UIG-READY
  exec busybox sleep 3600
  ;;
copyup-again)
  echo "UIG-LS $(busybox ls -a /web | busybox tr '\n' ' ')"
  echo UIG-READY
  exec busybox sleep 3600
  ;;
big)
  echo "UIG-BIG $(busybox md5sum /big/big.bin | busybox cut -d' ' -f1) $(busybox ls -a /big | busybox tr '\n' ' ')"
  echo UIG-READY
  exec busybox sleep 3600
  ;;
esac
echo "UIG-UNKNOWN-MODE $MODE"
`

interface Exec { code: number, stdout: string, stderr: string }

/** Runs a host tool; its exit code is the caller's business (e2fsck's are a bit mask). */
async function exec (cmd: string, args: string[]): Promise<Exec> {
  return await new Promise((resolve, reject) => {
    execFile(cmd, args, { encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err !== null && typeof err.code !== 'number') { reject(new Error(`cannot run ${cmd}: ${err.message}`, { cause: err })); return }
      resolve({ code: err === null ? 0 : Number(err.code), stdout, stderr })
    })
  })
}

/** A sparse file with ext4 on it, as the volume manager makes one; `from` fills it (mkfs.ext4 -d). */
async function makeVolume (path: string, from?: string, size = '64M'): Promise<void> {
  await exec('truncate', ['-s', size, path])
  const made = await exec('mkfs.ext4', ['-q', '-F', ...(from !== undefined ? ['-d', from] : []), path])
  assert.equal(made.code, 0, made.stderr)
  // Root's own file, unreadable by anyone else: a jailed QEMU opens it before it drops to its uid.
  await chmod(path, 0o600)
}

async function superblock (path: string): Promise<{ state: string, features: string[] }> {
  const { stdout } = await exec('dumpe2fs', ['-h', path])
  const field = (name: string): string => stdout.split('\n').find((l) => l.startsWith(`${name}:`))?.slice(name.length + 1).trim() ?? ''
  return { state: field('Filesystem state'), features: field('Filesystem features').split(/\s+/) }
}

async function debugfsCat (image: string, path: string): Promise<string> {
  const r = await exec('debugfs', ['-R', `cat ${path}`, image])
  return r.stdout
}

async function sha256 (path: string): Promise<string> {
  return createHash('sha256').update(await readFile(path)).digest('hex')
}

describe('persistent volumes in a real guest', () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let scratch: string
  let image: ImageManifest
  let accel: Accel
  let data: string
  let assets: string
  const driver = new QemuDriver({ livenessPollMs: 500, stopTimeouts: STOPS, ...(root ? { jail: JAIL } : {}) })
  const started: QemuVm[] = []
  let n = 0

  const start = async (volumes: GuestVolume[], env: Record<string, string>): Promise<QemuVm> => {
    const id = `vol${++n}`
    const launch: GuestLaunch = {
      manifest: image,
      kernelPath: ctx.store.blobPath(image.kernel.blob.digest),
      rootfsPath: ctx.store.blobPath(image.rootfs?.digest ?? ''),
      accel,
      vcpus: 1,
      memoryMiB: 64,
      network: { mode: 'none' },
      appEnv: env,
      volumes
    }
    const vm = await driver.spawn({ id, stateDir: VmStateDir.of(ctx.dataDir, id).dir, launch })
    started.push(vm)
    return vm
  }

  before(async () => {
    ctx = await createTestContext()
    scratch = await mkdtemp(join(tmpdir(), 'uigniter-volumes-'))
    // A squashfs root without an overlay: read-only, so the mount points ship in the image.
    const tree = join(scratch, 'tree')
    for (const sub of ['bin', 'data', 'ro']) await mkdir(join(tree, sub), { recursive: true })
    await copyFile(BUSYBOX, join(tree, 'bin/busybox'))
    await chmod(join(tree, 'bin/busybox'), 0o755)
    await writeFile(join(tree, 'app.sh'), APP, { mode: 0o755 })
    // What the image holds where a volume goes: a fresh volume gets a copy of it (owners kept when we can set them: as root).
    await mkdir(join(tree, 'web/sub'), { recursive: true })
    await writeFile(join(tree, 'web/index.html'), 'from the image\n', { mode: 0o640 })
    await writeFile(join(tree, 'web/sub/deep.txt'), 'deep\n')
    await symlink('index.html', join(tree, 'web/link'))
    await chmod(join(tree, 'web'), 0o750)
    if (root) {
      await chown(join(tree, 'web'), 33, 33)
      await chown(join(tree, 'web/index.html'), 1000, 1001)
      await lchown(join(tree, 'web/link'), 1000, 1001)
    }
    await mkdir(join(tree, 'big'))
    await writeFile(join(tree, 'big/big.bin'), BIG)
    image = await ctx.builder.build({ name: 'volumes', source: { kind: 'rootfs', dir: tree, entrypoint: '/app.sh', owners: 'keep' }, format: 'squashfs' })
    accel = (await chooseAccel(ctx.config, ctx.store.blobPath(image.kernel.blob.digest), image.kernel.blob.digest)).accel

    data = join(scratch, 'data.img')
    await makeVolume(data)
    const content = join(scratch, 'assets')
    await mkdir(content)
    await writeFile(join(content, 'hello.txt'), 'made on the host\n')
    assets = join(scratch, 'assets.img')
    await makeVolume(assets, content)
  })
  after(async () => {
    for (const vm of started) vm.kill()
    await Promise.all(started.map(async (vm) => await Promise.race([vm.exited, new Promise((resolve) => setTimeout(resolve, 3000))])))
    await ctx.cleanup()
    await rm(scratch, { recursive: true, force: true })
  })

  test('a volume file that is missing or not a regular file is refused before QEMU starts', { timeout: 10_000 }, async () => {
    const env = { MODE: 'again' }
    await rejectsWith(start([{ hostPath: join(scratch, 'nope.img'), guestPath: '/data', readOnly: false }], env), 'UIG_ERR_VOLUME_NOT_FOUND', join(scratch, 'nope.img'), 'does not exist')
    await rejectsWith(start([{ hostPath: scratch, guestPath: '/data', readOnly: false }], env), 'UIG_ERR_VOLUME_NOT_FOUND', scratch, 'not a regular file')
  })

  test('kill -9 after fsync: the data is on the host; a read-only volume refuses writes and stays unchanged; the journal replays', { timeout: 180_000 }, async () => {
    const assetsBefore = await sha256(assets)
    const vm = await start([
      { hostPath: data, guestPath: '/data', readOnly: false },
      { hostPath: assets, guestPath: '/ro', readOnly: true }
    ], { MODE: 'crash', PAYLOAD })
    if (root) {
      const status = await readFile(`/proc/${vm.pid}/status`, 'utf8')
      const uid = Number(/^Uid:\s+(\d+)/m.exec(status)?.[1])
      assert.ok(uid >= JAIL.uidBase, `QEMU runs as its jail's uid (${uid}), and opened the root-only volume files anyway`)
    }
    await consoleLine(vm, /^UIG-READY/)
    const out = await lines(vm)
    assert.ok(out.includes('UIG-SYNCED'), out.join('\n'))
    assert.match(out.find((l) => l.startsWith('UIG-RO ')) ?? '', /^UIG-RO refused: .*Read-only file system/)
    assert.ok(out.includes('UIG-RO-READ made on the host'))
    const mounts = out.filter((l) => l.startsWith('UIG-MOUNT '))
    assert.match(mounts[0] ?? '', /^UIG-MOUNT \/dev\/vd[a-z] \/data ext4 rw,nosuid,nodev,noatime\b/)
    assert.match(mounts[1] ?? '', /^UIG-MOUNT \/dev\/vd[a-z] \/ro ext4 ro,nosuid,nodev,noatime\b/)

    // The guest sees a volatile write cache, so ext4 sends the flushes that QEMU turns into fdatasync.
    assert.ok(out.includes('UIG-CACHE write back'), out.filter((l) => l.startsWith('UIG-CACHE')).join('\n'))

    // A power cut: no unmount, no sync by the init.
    vm.kill()
    const exit = await vm.exited
    assert.equal(exit.reason, 'killed', JSON.stringify(exit))
    assert.ok((await superblock(data)).features.includes('needs_recovery'), 'the journal was in use when QEMU died')
    assert.equal(await sha256(assets), assetsBefore, 'QEMU never wrote the read-only volume')
    assert.equal((await superblock(assets)).state, 'clean')

    // The host's own fsck replays the journal (on a copy: the next boot replays the original).
    const copy = join(scratch, 'data-copy.img')
    await exec('cp', ['--sparse=always', data, copy])
    const fix = await exec('e2fsck', ['-fy', copy])
    assert.ok(fix.code <= 1, `e2fsck -fy: ${fix.code} ${fix.stdout} ${fix.stderr}`)
    const check = await exec('e2fsck', ['-fn', copy])
    assert.equal(check.code, 0, `clean after the replay: ${check.stdout} ${check.stderr}`)
    assert.equal(await debugfsCat(copy, '/a.txt'), `${PAYLOAD}\n`, 'what the app fsynced survived')
  })

  test('a volume whose journal needs a replay cannot be attached read-only: the VM stops at boot and says why', { timeout: 120_000 }, async () => {
    const before = await sha256(data)
    const vm = await start([{ hostPath: data, guestPath: '/data', readOnly: true }], { MODE: 'again' })
    const exit = await vm.exited
    assert.equal(exit.reason, 'boot-failed', JSON.stringify(exit))
    assert.match(exit.detail, /mount volume 0 .* on \/data: Read-only file system \(its journal needs a replay: attach it read-write once\)/)
    assert.equal(await sha256(data), before, 'untouched')
  })

  test('the next boot replays the journal itself and finds the data; a graceful stop writes what was not synced and leaves the filesystem clean', { timeout: 180_000 }, async () => {
    const vm = await start([{ hostPath: data, guestPath: '/data', readOnly: false }], { MODE: 'again' })
    await consoleLine(vm, /^UIG-READY/)
    // The daemon's stop: the init's shutdown command, SIGTERM to the app, then the init's way out.
    const exit = await vm.stop({ graceMs: 5000 })
    const out = await lines(vm)
    assert.equal(exit.reason, 'stopped', `${JSON.stringify(exit)}\n${out.join('\n')}`)
    assert.ok(out.includes(`UIG-AGAIN ${PAYLOAD}`), out.join('\n'))
    assert.ok(!out.some((l) => l.includes('unmount volume')), 'the init unmounted it without a warning')

    const sb = await superblock(data)
    assert.equal(sb.state, 'clean')
    assert.ok(!sb.features.includes('needs_recovery'), `nothing left to replay: ${sb.features.join(' ')}`)
    const check = await exec('e2fsck', ['-fn', data])
    assert.equal(check.code, 0, `${check.stdout} ${check.stderr}`)
    assert.equal(await debugfsCat(data, '/a.txt'), `${PAYLOAD}\n`)
    assert.equal(await debugfsCat(data, '/b.txt'), 'second boot\n', 'written back at the stop, never synced by the app')
  })

  test('a fresh volume gets a copy of what the image has at its mount point, with owners, modes and links; once only', { timeout: 180_000 }, async () => {
    const web = join(scratch, 'web.img')
    await makeVolume(web)
    const first = await start([{ hostPath: web, guestPath: '/web', readOnly: false }], { MODE: 'copyup' })
    await consoleLine(first, /^UIG-READY/)
    const out = await lines(first)
    const stat = (name: string): string => out.find((l) => l.startsWith(`UIG-STAT ${name} `))?.slice(`UIG-STAT ${name} `.length) ?? `(no line for ${name})`
    const owner = (uid: number, gid: number): string => root ? `${uid} ${gid}` : '0 0'
    assert.equal(stat('/web'), `${owner(33, 33)} 750 directory`, 'the volume root takes the image directory\'s owner and mode')
    assert.equal(stat('/web/index.html'), `${owner(1000, 1001)} 640 regular file`, out.join('\n'))
    assert.equal(stat('/web/sub'), '0 0 755 directory')
    assert.equal(stat('/web/sub/deep.txt'), '0 0 644 regular file')
    // A symlink's mode means nothing on Linux; its owner is kept.
    assert.match(stat('/web/link'), new RegExp(`^${owner(1000, 1001)} [0-7]+ symbolic link$`))
    assert.ok(out.includes('UIG-LINK index.html'), 'a symlink is copied as a link')
    assert.ok(out.includes('UIG-CAT from the image'))
    assert.match(out.find((l) => l.startsWith('UIG-LS ')) ?? '', /^UIG-LS \. \.\. index\.html link lost\+found sub $/, 'no staging directory left')
    assert.equal((await first.stop({ graceMs: 5000 })).reason, 'stopped')
    assert.equal(await debugfsCat(web, '/sub/deep.txt'), 'deep\n', 'the copy is on the volume, not in the overlay')

    // The app deleted a file the image has: the volume is no longer fresh, so it is not copied again.
    const second = await start([{ hostPath: web, guestPath: '/web', readOnly: false }], { MODE: 'copyup-again' })
    await consoleLine(second, /^UIG-READY/)
    assert.match((await lines(second)).find((l) => l.startsWith('UIG-LS ')) ?? '', /^UIG-LS \. \.\. link lost\+found mine\.txt sub $/)
    assert.equal((await second.stop({ graceMs: 5000 })).reason, 'stopped')
  })

  test('a volume too small for the image\'s files stops the VM at boot and says so; made larger, the next boot copies again from the start', { timeout: 180_000 }, async () => {
    const small = join(scratch, 'small.img')
    await makeVolume(small, undefined, '4M')
    const failed = await start([{ hostPath: small, guestPath: '/big', readOnly: false }], { MODE: 'big' })
    const exit = await Promise.race([failed.exited, consoleLine(failed, /^UIG-BIG/).then((l) => ({ reason: 'running', detail: l }))])
    assert.equal(exit.reason, 'boot-failed', JSON.stringify(exit))
    assert.match(exit.detail, /volume 0 \(\/big\): copying the image's files into the new volume failed \(write big\.bin: No space left on device\); make the volume larger/)
    const fsck = await exec('e2fsck', ['-fy', small])
    assert.ok(fsck.code <= 1, `e2fsck -fy: ${fsck.code} ${fsck.stdout} ${fsck.stderr}`)
    // The half copy is in the staging directory, not at the root: the volume is still fresh.
    const listing = (await exec('debugfs', ['-R', 'ls /', small])).stdout
    assert.match(listing, /\.uigniter-copy-up/)
    assert.doesNotMatch(listing, /big\.bin/)
    await exec('truncate', ['-s', '64M', small])
    const grown = await exec('resize2fs', [small])
    assert.equal(grown.code, 0, grown.stderr)
    const vm = await start([{ hostPath: small, guestPath: '/big', readOnly: false }], { MODE: 'big' })
    await consoleLine(vm, /^UIG-READY/)
    const md5 = createHash('md5').update(BIG).digest('hex')
    assert.ok((await lines(vm)).includes(`UIG-BIG ${md5} . .. big.bin lost+found `), (await lines(vm)).filter((l) => l.startsWith('UIG-BIG')).join('\n'))
    assert.equal((await vm.stop({ graceMs: 5000 })).reason, 'stopped')
  })
})
