import assert from 'node:assert/strict'
import { holdDhcpPort } from '../helpers/dhcp-port-holder.js'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'
import { run } from '../../src/core/exec.js'
import type { Vm } from '../../src/core/vm.js'
import { createKernelSource } from '../../src/guest/guest-kernel.js'
import { consoleFields, dhcpRootfs, unikernelCmdline, unikernelDisk } from '../helpers/busybox-guests.js'
import { DaemonProcess } from '../helpers/daemon-process.js'
import { createTestContext, runCli, type TestContext } from '../helpers/fixtures.js'

/**
 * Bring-your-own unikernels on the bridge, through a real daemon: a guest
 * running a real DHCP client (busybox's udhcpc) gets what uigniter
 * allocated from the daemon's dnsmasq, and a unikernel reads back its
 * command line with the placeholders filled. Two VMs in all.
 */
describe('unikernels on the bridge: DHCP and command-line placeholders', { timeout: 300_000 }, () => {
  let ctx: TestContext & { cleanup: () => Promise<void> }
  let daemon: DaemonProcess
  let kernelPath: string
  const subnet = `10.246.${10 + Math.floor(Math.random() * 200)}`

  /** Waits until the VM's console has `marker`, and returns the console. */
  async function consoleUntil (vm: Vm, marker: string, timeoutMs = 90_000): Promise<string> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const logs = (await daemon.api.call<string>('GET', `/v1/vms/${vm.id}/logs?tail=100000`)).replaceAll('\r', '')
      if (logs.includes(marker)) return logs
      if (Date.now() > deadline) throw new Error(`no ${marker} on the console of ${vm.name}:\n${logs.slice(-3000)}`)
      await sleep(200)
    }
  }

  before(async () => {
    ctx = await createTestContext()
    kernelPath = (await createKernelSource(ctx.config).get()).path
    const work = join(ctx.dataDir, 'work')
    await mkdir(work, { recursive: true })
    const rootfs = await dhcpRootfs(join(work, 'dhcp-rootfs'))
    await ctx.builder.build({ name: 'dhcp-client', source: { kind: 'rootfs', dir: rootfs.dir, entrypoint: rootfs.entrypoint }, memoryMiB: 64 })
    await ctx.builder.build({ name: 'uk-probe', source: { kind: 'unikernel', kernel: kernelPath, disk: await unikernelDisk(work), cmdline: unikernelCmdline('probe') }, memoryMiB: 64 })
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `${subnet}.0/24` })
    await daemon.start()
  })

  after(async () => {
    await daemon.removeEverything()
    await ctx.cleanup()
  })

  test('the daemon runs a DHCP server on its bridge', async () => {
    // Its log says so; the failure of one would be logged with UIG_ERR_NET_DHCP_FAILED instead.
    const deadline = Date.now() + 10_000
    while (!daemon.output.includes('DHCP server running') && Date.now() < deadline) await sleep(100)
    assert.match(daemon.output, /DHCP server running/)
    assert.doesNotMatch(daemon.output, /UIG_ERR_NET_DHCP_FAILED/)
  })

  test('a guest with a real DHCP client gets its allocated address, the bridge gateway and the DNS', { timeout: 120_000 }, async () => {
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { image: 'dhcp-client', network: 'bridge' })
    const logs = await consoleUntil(vm, 'UIG-DONE')
    const lease = consoleFields(logs, 'UIG-LEASE')
    assert.ok(vm.ipAddress?.startsWith(`${subnet}.`), vm.ipAddress ?? 'no address')
    assert.deepEqual(lease, { ip: vm.ipAddress, mask: '255.255.255.0', router: `${subnet}.1`, dns: (await hostNameservers()).join(' ') }, logs.slice(-2000))
  })

  test('a unikernel reads back its command line with its own values, and takes the same address by DHCP', { timeout: 120_000 }, async () => {
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { name: 'uk-probe-1', image: 'uk-probe', network: 'bridge' })
    const logs = await consoleUntil(vm, 'UIG-DONE')
    const cmdline = logs.split('\n').find((l) => l.startsWith('UIG-CMDLINE ')) ?? ''
    const dns = (await hostNameservers())[0] ?? ''
    for (const param of [`uig_ip=${vm.ipAddress ?? '?'}`, 'uig_prefix=24', 'uig_mask=255.255.255.0', `uig_gw=${subnet}.1`, `uig_dns=${dns}`, 'uig_host=uk-probe-1', 'uig_lit={x}']) {
      assert.ok(cmdline.split(' ').includes(param), `${param} in ${cmdline}`)
    }
    assert.doesNotMatch(cmdline, /\{ip\}|\{gateway\}/)
    // The kernel handed them to its init as environment variables, too.
    assert.deepEqual(consoleFields(logs, 'UIG-ENV'), { ip: vm.ipAddress, prefix: '24', mask: '255.255.255.0', gw: `${subnet}.1`, dns, host: 'uk-probe-1', lit: '{x}' })
    // Both ways agree: DHCP hands out the very address the command line carries.
    assert.equal(consoleFields(logs, 'UIG-LEASE')?.ip, vm.ipAddress)
  })

  test('port 67 taken on the bridge: the daemon logs the coded error, serves command-line VMs, and gets DHCP once it is free', { timeout: 180_000 }, async () => {
    await daemon.removeEverything()
    // A second daemon on a bridge made beforehand, on which another program holds UDP port 67.
    const second = `${subnet.split('.').slice(0, 2).join('.')}.${(Number(subnet.split('.')[2]) + 1) % 250}`
    daemon = await DaemonProcess.create(ctx.dataDir, { UIGNITER_SUBNET: `${second}.0/24` })
    const bridge = daemon.env.UIGNITER_BRIDGE ?? ''
    await run('ip', ['link', 'add', bridge, 'type', 'bridge'])
    await run('ip', ['addr', 'add', `${second}.1/24`, 'dev', bridge])
    await run('ip', ['link', 'set', bridge, 'up'])
    const holder = await holdDhcpPort(bridge)
    try {
      await daemon.start()
      assert.match(daemon.output, /UIG_ERR_NET_DHCP_FAILED/)
      assert.match(daemon.output, /Address already in use/)

      const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { name: 'uk-nodhcp', image: 'uk-probe', network: 'bridge' })
      const logs = await consoleUntil(vm, 'UIG-DONE')
      assert.equal(consoleFields(logs, 'UIG-ENV')?.ip, vm.ipAddress, 'the command line still carries the address')
      assert.deepEqual(consoleFields(logs, 'UIG-LEASE'), { none: '' }, 'no DHCP server answered')
    } finally {
      await holder.release()
    }
    // The daemon keeps retrying with a backoff; once the port is free its server runs.
    const deadline = Date.now() + 60_000
    while (!daemon.output.includes('DHCP server running') && Date.now() < deadline) await sleep(200)
    assert.match(daemon.output, /DHCP server running/)
    const vm = await daemon.api.call<Vm>('POST', '/v1/vms', { name: 'uk-dhcp', image: 'uk-probe', network: 'bridge' })
    assert.equal(consoleFields(await consoleUntil(vm, 'UIG-DONE'), 'UIG-LEASE')?.ip, vm.ipAddress)
  })

  test('an unknown placeholder is refused at build time, from flags and from a spec file, with its code', { timeout: 60_000 }, async () => {
    const flags = await runCli(['image', 'build', '--kernel', kernelPath, '--cmdline', 'console=ttyS0 --ip=eth0,{ip},{foo}', '-t', 'bad-uk'], { env: ctx.env })
    assert.equal(flags.code, 1, flags.stderr)
    assert.match(flags.stderr, /error UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER: unknown placeholder \{foo\} at character 30/)
    assert.match(flags.stderr, /\{ip\}, \{prefix\}, \{netmask\}, \{gateway\}, \{dns\}, \{hostname\}/)
    const specFile = join(ctx.dataDir, 'bad-uk.json')
    await writeFile(specFile, JSON.stringify({ name: 'bad-uk', source: { kind: 'unikernel', kernel: kernelPath, cmdline: 'x={ip} y={' } }))
    const spec = await runCli(['image', 'build', '-f', specFile], { env: ctx.env })
    assert.equal(spec.code, 1, spec.stderr)
    assert.match(spec.stderr, /error UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER: the command line has a "\{" at character 10 that opens no placeholder/)
    const images = await runCli(['image', 'ls', '--json'], { env: ctx.env })
    assert.ok(!images.stdout.includes('bad-uk'), 'nothing was stored')
  })
})

/** What the daemon hands guests: the host's nameservers that are not on loopback. */
async function hostNameservers (): Promise<string[]> {
  const text = await readFile('/etc/resolv.conf', 'utf8').catch(() => '')
  return text.split('\n').map((l) => l.trim().split(/\s+/)).filter(([k, a]) => k === 'nameserver' && a !== undefined && /^\d+\.\d+\.\d+\.\d+$/.test(a) && !a.startsWith('127.')).map(([, a]) => a ?? '').slice(0, 3)
}
