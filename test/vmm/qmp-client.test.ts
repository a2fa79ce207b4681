import assert from 'node:assert/strict'
import { spawn, type ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { test } from 'node:test'
import { QEMU_BINARY } from '../../src/vmm/qemu/qemu-binary.js'
import { QmpClient, QmpError, type QmpEvent } from '../../src/vmm/qemu/qmp-client.js'
import { rejectsWith, tempDir } from '../helpers/assertions.js'

/** A real QEMU with no guest at all (`-M none`, paused): enough to talk QMP to. */
function startQemu (socket: string): ChildProcess {
  return spawn(QEMU_BINARY, ['-M', 'none', '-S', '-nodefaults', '-no-user-config', '-display', 'none', '-qmp', `unix:${socket},server=on,wait=off`], { stdio: 'ignore' })
}

test('QMP against a real QEMU: greeting, query-status, stop/cont with their events, pipelined commands, errors, quit', async (t) => {
  const dir = await tempDir(t)
  const socket = join(dir, 'qmp.sock')
  const qemu = startQemu(socket)
  const gone = new Promise((resolve) => qemu.once('exit', resolve))
  t.after(() => { qemu.kill('SIGKILL') })

  const qmp = await QmpClient.connect(socket, { timeoutMs: 10_000 })
  assert.equal(qmp.greeting.version.qemu.major >= 7, true)
  const events: QmpEvent[] = []
  qmp.on('event', (e: QmpEvent) => events.push(e))

  assert.deepEqual(await qmp.queryStatus(), { running: false, status: 'prelaunch' })
  await qmp.cont()
  assert.deepEqual(await qmp.queryStatus(), { running: true, status: 'running' })
  await qmp.stop()
  assert.deepEqual(await qmp.queryStatus(), { running: false, status: 'paused' })
  assert.deepEqual(events.map((e) => e.event), ['RESUME', 'STOP'])
  assert.ok(events.every((e) => e.timestamp.seconds > 0))

  // Sent together, answered in order, each matched to its request.
  const [status, commands, version] = await Promise.all([
    qmp.queryStatus(),
    qmp.execute<Array<{ name: string }>>('query-commands'),
    qmp.execute<{ qemu: { major: number } }>('query-version')
  ])
  assert.equal(status.status, 'paused')
  assert.ok(commands.some((c) => c.name === 'query-cpus-fast'))
  assert.equal(version.qemu.major, qmp.greeting.version.qemu.major)

  await assert.rejects(qmp.execute('no-such-command'), (err: unknown) => {
    assert.ok(err instanceof QmpError)
    assert.equal(err.code, 'UIG_ERR_QMP')
    assert.equal(err.qmpClass, 'CommandNotFound')
    assert.match(err.message, /no-such-command/)
    return true
  })
  await rejectsWith(qmp.execute('cont', { bogus: 1 }), 'UIG_ERR_QMP', 'GenericError')

  const closed = new Promise((resolve) => qmp.once('close', resolve))
  await qmp.quit()
  await closed
  assert.deepEqual(events.at(-1)?.event, 'SHUTDOWN')
  assert.deepEqual(events.at(-1)?.data, { guest: false, reason: 'host-qmp-quit' })
  await gone
  await rejectsWith(qmp.queryStatus(), 'UIG_ERR_QMP', 'closed')
})

test('QMP: a client reconnects after another one let go; connecting to nothing fails by the deadline', async (t) => {
  const dir = await tempDir(t)
  const socket = join(dir, 'qmp.sock')
  const qemu = startQemu(socket)
  t.after(() => { qemu.kill('SIGKILL') })
  const first = await QmpClient.connect(socket, { timeoutMs: 10_000 })
  first.close()
  const second = await QmpClient.connect(socket, { timeoutMs: 5000 })
  assert.equal((await second.queryStatus()).status, 'prelaunch')
  second.close()

  const begun = Date.now()
  await rejectsWith(QmpClient.connect(join(dir, 'missing.sock'), { timeoutMs: 300 }), 'UIG_ERR_QMP', 'within 300 ms')
  assert.ok(Date.now() - begun < 2000)
})
