import assert from 'node:assert/strict'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import type { ServiceStatus } from '../../src/core/service.js'
import type { Vm } from '../../src/core/vm.js'
import { createKernelSource } from '../../src/guest/guest-kernel.js'
import { unikernelCmdline, unikernelDisk } from '../helpers/busybox-guests.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { createTestContext, type TestContext } from '../helpers/fixtures.js'
import { httpGet } from '../helpers/http-load.js'

/**
 * A service whose replicas are bring-your-own unikernels (our kernel and a
 * busybox disk whose init takes its address from the placeholders of its
 * command line and serves HTTP): they start cold, pass their health
 * checks, take traffic through the gateway and are replaced when they die.
 */
describe('a service of unikernel replicas', { timeout: 300_000 }, () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let daemon: DaemonProcess
  let gateway: string

  async function waitFor (name: string, check: (s: ServiceStatus) => boolean, timeoutMs = 90_000): Promise<ServiceStatus> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const status = await daemon.api.call<ServiceStatus>('GET', `/v1/services/${name}`)
      if (check(status)) return status
      if (Date.now() > deadline) throw new Error(`service ${name} never got there: ${JSON.stringify({ ...status, spec: undefined })}`)
      await sleep(200)
    }
  }
  const healthy = (s: ServiceStatus): string[] => s.endpoints.filter((e) => e.health === 'healthy' && e.vm !== null).map((e) => e.id)

  before(async () => {
    ctx = await createTestContext()
    const work = join(ctx.dataDir, 'work')
    await mkdir(work, { recursive: true })
    const kernel = (await createKernelSource(ctx.config).get()).path
    await ctx.builder.build({
      name: 'uk-web',
      source: { kind: 'unikernel', kernel, disk: await unikernelDisk(work), cmdline: unikernelCmdline('serve') },
      memoryMiB: 64,
      ports: [{ port: 8080, protocol: 'http' }]
    })
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `10.247.${10 + Math.floor(Math.random() * 200)}.0/24` })
    await daemon.start()
    gateway = `http://127.0.0.1:${daemon.gatewayPort}`
  })

  after(async () => {
    await daemon.removeEverything()
    await ctx.cleanup()
  })

  test('replicas start cold (startPath clone falls back), pass health checks and serve through the gateway', { timeout: 180_000 }, async () => {
    // No startPath: the default, clone, which a unikernel cannot do (no init to take a clone's identity).
    const applied = await daemon.api.call<ServiceStatus>('PUT', '/v1/services/ukweb', {
      image: 'uk-web', replicas: { min: 2 }, ports: [{ port: 8080 }], healthCheck: { path: '/', intervalMs: 300, unhealthyThreshold: 2 }
    })
    assert.equal(applied.spec.startPath, 'cold')
    assert.match(daemon.output, /falls back to cold for a unikernel image/)

    const status = await waitFor('ukweb', (s) => healthy(s).length === 2)
    const vms = await Promise.all(healthy(status).map(async (id) => await daemon.api.call<Vm>('GET', `/v1/vms/${id}`)))
    for (const vm of vms) {
      assert.equal(vm.startPath, 'cold')
      assert.equal(vm.template, null)
      assert.equal(vm.service?.name, 'ukweb')
    }

    // Each replica answers with the name and address its command line gave it; the gateway reaches both.
    const expected = new Set(vms.map((vm) => `unikernel ${vm.name} at ${vm.ipAddress ?? '?'}`))
    const seen = new Set<string>()
    for (let i = 0; i < 20 && seen.size < expected.size; i++) {
      const res = await httpGet(`${gateway}/svc/ukweb/`)
      assert.equal(res.status, 200, res.body)
      seen.add(res.body.trim())
    }
    assert.deepEqual([...seen].sort(), [...expected].sort())

    // A replica that dies is replaced by a new one, which is health-checked before it takes traffic.
    const victim = vms[0]
    assert.ok(victim !== undefined)
    await daemon.api.call('POST', `/v1/vms/${victim.id}/kill`)
    const healed = await waitFor('ukweb', (s) => healthy(s).length === 2 && !healthy(s).includes(victim.id))
    assert.equal(healthy(healed).length, 2)
    const res = await httpGet(`${gateway}/svc/ukweb/`)
    assert.equal(res.status, 200)
    assert.match(res.body, /^unikernel \S+ at \d+\.\d+\.\d+\.\d+/)
  })
})
