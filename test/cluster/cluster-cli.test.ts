import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, it } from 'node:test'
import type { NodeView } from '../../src/core/cluster.js'
import { loadConfig } from '../../src/core/config.js'
import { ImageBuilder } from '../../src/guest/image-builder.js'
import { createKernelSource } from '../../src/guest/guest-kernel.js'
import { ImageStore } from '../../src/guest/image-store.js'
import { ClusterDaemons } from '../helpers/cluster-daemons.js'
import { startClusterLab, type ClusterLab } from '../helpers/cluster-lab.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { exampleSpec, packageRoot } from '../helpers/fixtures.js'

interface CliResult { code: number | null, stdout: string, stderr: string }

/**
 * The CLI as a child process, as runCli (test/helpers/fixtures.ts) runs it,
 * but killed at a deadline: a CLI that hangs on a cluster call must fail the
 * test, not keep the runner waiting.
 */
async function cli (args: string[], env: NodeJS.ProcessEnv, timeoutMs = 60_000): Promise<CliResult> {
  return await new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(packageRoot, 'dist/src/daemon/main.js'), ...args], { env, cwd: packageRoot, stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs, killSignal: 'SIGKILL' })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (c: Buffer) => { stdout += c.toString() })
    child.stderr.on('data', (c: Buffer) => { stderr += c.toString() })
    child.on('error', reject)
    child.on('close', (code, signal) => resolve({ code, stdout, stderr: signal !== null ? `${stderr}\n(killed by ${signal} after ${timeoutMs} ms)` : stderr }))
  })
}

/** A table's rows as cells (columns are two or more spaces apart; the header row dropped). */
function rows (table: string): string[][] {
  return table.trimEnd().split('\n').slice(1).map((line) => line.trim().split(/\s{2,}/))
}

/**
 * The cluster commands of the CLI against two real nodes (network
 * namespaces, one etcd member, a daemon each) and one single-host daemon.
 * One VM in all: a hello guest on n2.
 */
describe('the CLI in a cluster of two nodes', { timeout: 600_000 }, () => {
  let lab: ClusterLab
  let daemons: ClusterDaemons
  let env: NodeJS.ProcessEnv
  const configOf = (i: number): string => join(lab.dir, `cli-config-n${i}.json`)
  const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))

  /** Runs the CLI until `check` holds for its result; the last result in the error otherwise. */
  async function cliUntil (what: string, args: string[], check: (r: CliResult) => boolean, timeoutMs = 30_000): Promise<CliResult> {
    const deadline = Date.now() + timeoutMs
    let last: CliResult | undefined
    while (Date.now() < deadline) {
      last = await cli(args, env)
      if (check(last)) return last
      await sleep(500)
    }
    assert.fail(`${what}: not within ${timeoutMs} ms; "uigniter ${args.join(' ')}" last said (exit ${String(last?.code)}):\n${last?.stdout ?? ''}${last?.stderr ?? ''}`)
  }

  before(async () => {
    lab = await startClusterLab({ nodes: 2, etcdMembers: 1, name: 'uigcli' })
    // On both nodes: a VM outside any service, placed with `node`, is created by that node's manager, which does
    // not fetch a missing image from a peer (only a replica's placement does, through the node agent's ensureImage).
    const spec = JSON.parse(await readFile(exampleSpec('hello'), 'utf8')) as Parameters<ImageBuilder['build']>[0]
    for (const i of [1, 2]) {
      const dataDir = lab.node(i).dataDir
      await new ImageBuilder(new ImageStore(dataDir), createKernelSource(loadConfig({ ...process.env, UIGNITER_DATA_DIR: dataDir }))).build(spec, join(packageRoot, 'examples', 'hello'))
    }
    // A config file of our own: ClusterDaemons' keeps the default subnetRange (10.78.0.0/16), which holds only the
    // default lab's subnets, and its jail uids, which the default lab's daemons may be using on this kernel right now.
    for (const i of [1, 2]) {
      await writeFile(configOf(i), JSON.stringify({ jail: { uidBase: 900_000 + i * 10_000, uidCount: 1000, gid: 640_000 }, cluster: { leaseTtlS: 4, subnetRange: lab.clusterRange } }))
    }
    daemons = new ClusterDaemons(lab, (i) => ({ UIGNITER_CONFIG: configOf(i), UIGNITER_NODE_MEMORY_MIB: '1024', UIGNITER_NODE_LABELS: 'disk=ssd' }))
    await Promise.all([1, 2].map(async (i) => { await daemons.start(i) }))
    env = { ...daemons.env(1), UIGNITER_HOST: lab.node(1).apiUrl }
    const deadline = Date.now() + 60_000
    for (;;) {
      const views = await daemons.api(1).call<NodeView[]>('GET', '/v1/nodes').catch(() => [])
      if (views.length === 2 && views.every((n) => n.state === 'ready') && views.some((n) => n.leader)) break
      if (Date.now() > deadline) throw new Error(`the two nodes did not join under a leader: ${JSON.stringify(views.map((n) => [n.name, n.state, n.leader]))}`)
      await sleep(250)
    }
  })

  after(async () => {
    await daemons?.api(2).call('DELETE', '/v1/vms/x?force=true').catch(() => {})
    await daemons?.stopAll()
    await lab?.close()
  })

  it('node ls lists both nodes, their labels and capacity, and one leader', async (t) => {
    const r = await cli(['node', 'ls'], env)
    t.diagnostic(r.stdout)
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /^NAME\s+ADDRESS\s+STATE\s+LABELS\s+VCPUS\s+MEMORY MiB\s+VMS\s+LEADER$/m)
    const table = rows(r.stdout)
    assert.deepEqual(table.map((cells) => [cells[0], cells[1], cells[2], cells[3]]), [
      ['n1', lab.node(1).underlay, 'ready', 'disk=ssd'],
      ['n2', lab.node(2).underlay, 'ready', 'disk=ssd']
    ])
    assert.ok(table.every((cells) => /^\d+\/1024$/.test(cells[5] ?? '')), r.stdout)
    assert.equal(table.filter((cells) => cells[7] === '*').length, 1, r.stdout)
    const json = JSON.parse((await cli(['node', 'ls', '--json'], env)).stdout) as NodeView[]
    assert.deepEqual(json.map((n) => n.name), ['n1', 'n2'])
  })

  it('cordon and uncordon change the node\'s STATE', async () => {
    const cordoned = await cli(['node', 'cordon', 'n2'], env)
    assert.equal(cordoned.code, 0, cordoned.stderr)
    assert.equal(cordoned.stdout.trim(), 'n2  cordoned')
    await cliUntil('n2 shown cordoned', ['node', 'ls'], (r) => rows(r.stdout).some((c) => c[0] === 'n2' && c[2] === 'cordoned'))
    const inspect = JSON.parse((await cli(['node', 'inspect', 'n2'], env)).stdout) as NodeView & { placements: unknown[] }
    assert.equal(inspect.cordoned, true)
    assert.deepEqual(inspect.placements, [])
    const uncordoned = await cli(['node', 'uncordon', 'n2'], env)
    assert.equal(uncordoned.stdout.trim(), 'n2  ready')
    await cliUntil('n2 shown ready', ['node', 'ls'], (r) => rows(r.stdout).some((c) => c[0] === 'n2' && c[2] === 'ready'))
  })

  it('refuses a malformed node name before calling the daemon', async () => {
    const r = await cli(['run', '-d', '--node', 'N_2', 'hello'], env)
    assert.equal(r.code, 2)
    assert.match(r.stderr, /UIG_ERR_CLI_USAGE: --node is 1 to 32 lowercase/)
    const unknown = await cli(['node', 'cordon', 'n9'], env)
    assert.equal(unknown.code, 1)
    assert.match(unknown.stderr, /UIG_ERR_NODE_NOT_FOUND/)
  })

  it('run --node n2 runs the VM on n2, and ps shows it with its NODE', async (t) => {
    const r = await cli(['run', '-d', '--node', 'n2', '--name', 'x', 'hello'], env, 300_000)
    assert.equal(r.code, 0, r.stderr)
    const id = r.stdout.trim()
    assert.match(id, /^[0-9a-f]{12,}$/)
    const ps = await cliUntil('x running on n2', ['ps'], (p) => rows(p.stdout).some((c) => c[1] === 'x' && c[2] === 'n2' && c[4] === 'running'), 120_000)
    t.diagnostic(ps.stdout)
    assert.match(ps.stdout, /^ID\s+NAME\s+NODE\s+IMAGE\s+STATE/m)
    assert.equal(ps.stderr, '')
    const onN2 = await daemons.api(2).call<Array<{ name: string }>>('GET', '/v1/vms')
    assert.deepEqual(onN2.map((vm) => vm.name), ['x'])
  })

  it('drain of n2 with a plain VM moves nothing and says so; the VM stays', async (t) => {
    const r = await cli(['node', 'drain', 'n2', '--timeout', '30'], env, 90_000)
    t.diagnostic(r.stdout)
    assert.equal(r.code, 0, r.stderr)
    assert.match(r.stdout, /^n2 cordoned; no replica to move$/m)
    const ps = await cli(['ps'], env)
    assert.ok(rows(ps.stdout).some((c) => c[1] === 'x' && c[2] === 'n2' && c[4] === 'running'), ps.stdout)
    await cli(['node', 'uncordon', 'n2'], env)
  })

  it('a single-host daemon answers node ls with UIG_ERR_CLUSTER_NOT_ENABLED, and ps stays as it was', async (t) => {
    const dataDir = await mkdtemp(join(tmpdir(), 'uigniter-cli-single-'))
    const daemon = await DaemonProcess.create(dataDir, { UIGNITER_SUBNET: `10.231.${Math.floor(Math.random() * 200)}.0/24`, UIGNITER_ACCEL: 'tcg' })
    t.after(async () => {
      await daemon.removeEverything().catch(() => {})
      await rm(dataDir, { recursive: true, force: true })
    })
    await daemon.start()
    const r = await cli(['node', 'ls'], daemon.env)
    assert.equal(r.code, 1)
    assert.match(r.stderr, /^error UIG_ERR_CLUSTER_NOT_ENABLED: this daemon runs a single host/m)
    const ps = await cli(['ps'], daemon.env)
    assert.equal(ps.code, 0, ps.stderr)
    assert.match(ps.stdout, /^ID\s+NAME\s+IMAGE\s+STATE/m)
  })
})
