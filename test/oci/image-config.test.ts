import assert from 'node:assert/strict'
import { chmod, mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { test } from 'node:test'
import { mapImageConfig } from '../../src/oci/image-config.js'
import { UigniterError } from '../../src/core/errors.js'

const PASSWD = 'root:x:0:0:root:/root:/bin/sh\n# a comment\napp:x:1000:1001::/home/app:/bin/sh\nnobody:x:65534:65534::/:/usr/sbin/nologin\n'
const GROUP = 'root:x:0:\nstaff:x:50:\napp:x:1001:\n'

async function tree (t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'uig-imgcfg-'))
  t.after(async () => { await rm(dir, { recursive: true, force: true }) })
  const root = join(dir, 'root')
  await mkdir(join(root, 'etc'), { recursive: true })
  await mkdir(join(root, 'usr/bin'), { recursive: true })
  await mkdir(join(root, 'app'), { recursive: true })
  await writeFile(join(root, 'etc/passwd'), PASSWD)
  await writeFile(join(root, 'etc/group'), GROUP)
  for (const exe of ['usr/bin/python3.11', 'usr/bin/dash', 'app/server']) {
    await writeFile(join(root, exe), '#!')
    await chmod(join(root, exe), 0o755)
  }
  await writeFile(join(root, 'usr/bin/not-exec'), 'x')
  await symlink('python3.11', join(root, 'usr/bin/python3'))
  // Merged /usr with an absolute link, as debootstrap makes it: resolved inside the tree, not on the host.
  await symlink('/usr/bin', join(root, 'bin'))
  return root
}

async function refused (promise: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof UigniterError, String(err))
    assert.equal(err.code, code)
    assert.match(err.message, pattern)
    return true
  })
}

test('Entrypoint and Cmd combine per the OCI rules; a bare program is looked up in the image\'s PATH', async (t) => {
  const root = await tree(t)
  const argv = async (config: Record<string, unknown>): Promise<string[]> => (await mapImageConfig({ config }, root)).entrypoint
  assert.deepEqual(await argv({ Entrypoint: ['/app/server'], Cmd: ['--port', '80'] }), ['/app/server', '--port', '80'])
  assert.deepEqual(await argv({ Entrypoint: null, Cmd: ['python3', '-m', 'http.server'] }), ['/usr/bin/python3', '-m', 'http.server'])
  assert.deepEqual(await argv({ Entrypoint: ['dash', '-c'], Cmd: null }), ['/usr/bin/dash', '-c'])
  assert.deepEqual(await argv({ Entrypoint: ['sh'], Env: ['PATH=/bin'] }).catch((e: Error) => [e.message]), ['the image\'s entrypoint "sh" is in no directory of its PATH (/bin)'])
  assert.deepEqual(await argv({ Cmd: ['dash'], Env: ['PATH=/opt/none:/bin'] }), ['/bin/dash'], 'through /bin -> /usr/bin, inside the tree')
  assert.deepEqual(await argv({ Cmd: ['./server'], WorkingDir: '/app' }), ['/app/server'])
  await refused(mapImageConfig({ config: { Cmd: [] } }, root), 'UIG_ERR_IMAGE_NO_ENTRYPOINT', /neither Entrypoint nor Cmd/)
  await refused(mapImageConfig({ config: null }, root), 'UIG_ERR_IMAGE_NO_ENTRYPOINT', /neither Entrypoint nor Cmd/)
  await refused(mapImageConfig({ config: { Cmd: ['/usr/bin/not-exec'] } }, root), 'UIG_ERR_IMAGE_NO_ENTRYPOINT', /not an executable file/)
})

test('User by name, by uid, by uid:gid and name:group, resolved from the tree\'s own /etc/passwd and /etc/group', async (t) => {
  const root = await tree(t)
  const user = async (User: string): Promise<{ uid: number; gid: number }> => (await mapImageConfig({ config: { User, Cmd: ['/app/server'] } }, root)).user
  assert.deepEqual(await user(''), { uid: 0, gid: 0 })
  assert.deepEqual(await user('app'), { uid: 1000, gid: 1001 })
  assert.deepEqual(await user('1000'), { uid: 1000, gid: 1001 }, 'a uid in passwd takes its primary group')
  assert.deepEqual(await user('4242'), { uid: 4242, gid: 0 }, 'a uid not in passwd runs with gid 0, as Docker does')
  assert.deepEqual(await user('1000:50'), { uid: 1000, gid: 50 })
  assert.deepEqual(await user('app:staff'), { uid: 1000, gid: 50 })
  assert.deepEqual(await user('nobody'), { uid: 65534, gid: 65534 })
  await refused(user('ghost'), 'UIG_ERR_OCI_CONFIG_INVALID', /no user "ghost" in the image's \/etc\/passwd/)
  await refused(user('app:ghosts'), 'UIG_ERR_OCI_CONFIG_INVALID', /no group "ghosts" in the image's \/etc\/group/)
  await refused(user('99999999999'), 'UIG_ERR_OCI_CONFIG_INVALID', /out of range/)
  await refused(user('a:b:c'), 'UIG_ERR_OCI_CONFIG_INVALID', /not user\[:group\]/)
})

test('an /etc/passwd that is a symlink out of the tree is resolved inside it', async (t) => {
  const root = await tree(t)
  const outside = join(root, '..', 'outside-passwd')
  await writeFile(outside, 'evil:x:0:0::/:/bin/sh\n')
  await rm(join(root, 'etc/passwd'))
  await symlink('../../outside-passwd', join(root, 'etc/passwd'))
  await refused(mapImageConfig({ config: { User: 'evil', Cmd: ['/app/server'] } }, root), 'UIG_ERR_OCI_CONFIG_INVALID', /no user "evil"/)
})

test('Env, WorkingDir, ExposedPorts, StopSignal and Labels', async (t) => {
  const root = await tree(t)
  const run = await mapImageConfig({
    architecture: 'amd64',
    os: 'linux',
    config: {
      Env: ['PATH=/usr/bin:/bin', 'LANG=C.UTF-8', 'EMPTY=', 'EQ=a=b', 'LANG=en_US.UTF-8'],
      WorkingDir: '/app/./sub/',
      ExposedPorts: { '8080/tcp': {}, '53/udp': {}, 9000: {}, '8080/TCP': {} },
      StopSignal: 'quit',
      Labels: { 'org.opencontainers.image.title': 'demo' },
      Cmd: ['/app/server'],
      Volumes: { '/data': {} },
      ArgsEscaped: true
    },
    rootfs: { type: 'layers', diff_ids: [] },
    history: []
  }, root)
  assert.deepEqual(run.env, { PATH: '/usr/bin:/bin', LANG: 'en_US.UTF-8', EMPTY: '', EQ: 'a=b' })
  assert.equal(run.workingDir, '/app/sub/')
  assert.deepEqual(run.ports, [{ port: 53, protocol: 'udp' }, { port: 8080, protocol: 'tcp' }, { port: 9000, protocol: 'tcp' }])
  assert.equal(run.stopSignal, 'SIGQUIT')
  assert.deepEqual(run.labels, { 'org.opencontainers.image.title': 'demo' })
  const defaults = await mapImageConfig({ config: { Cmd: ['/app/server'], StopSignal: '9' } }, root)
  assert.equal(defaults.workingDir, '/')
  assert.equal(defaults.stopSignal, 'SIGKILL')
  assert.deepEqual([defaults.env, defaults.ports, defaults.labels], [{}, [], {}])
})

test('bad configs are refused with a message that names the field', async (t) => {
  const root = await tree(t)
  const bad: Array<[unknown, RegExp]> = [
    ['not an object', /Expected object/],
    [{ config: { Cmd: 'python3' } }, /\/config/],
    [{ config: { Env: [42], Cmd: ['/app/server'] } }, /\/config/],
    [{ config: { Labels: { a: 1 }, Cmd: ['/app/server'] } }, /\/config/],
    [{ architecture: 'arm64', config: { Cmd: ['/app/server'] } }, /for arm64/],
    [{ os: 'windows', config: { Cmd: ['/app/server'] } }, /for windows/],
    [{ config: { Env: ['NOEQUALS'], Cmd: ['/app/server'] } }, /has no "="/],
    [{ config: { Env: ['BAD-NAME=1'], Cmd: ['/app/server'] } }, /NAME of letters/],
    [{ config: { WorkingDir: 'relative', Cmd: ['/app/server'] } }, /not an absolute path/],
    [{ config: { ExposedPorts: { '70000/tcp': {} }, Cmd: ['/app/server'] } }, /ExposedPorts "70000\/tcp"/],
    [{ config: { ExposedPorts: { '80/sctp': {} }, Cmd: ['/app/server'] } }, /ExposedPorts "80\/sctp"/],
    [{ config: { StopSignal: 'SIGNOPE', Cmd: ['/app/server'] } }, /not a signal name/],
    [{ config: { StopSignal: '99', Cmd: ['/app/server'] } }, /not a signal number/],
    [{ config: { Cmd: ['/app/server', 'a\0b'] } }, /NUL byte/]
  ]
  for (const [config, pattern] of bad) await refused(mapImageConfig(config, root), 'UIG_ERR_OCI_CONFIG_INVALID', pattern)
})
