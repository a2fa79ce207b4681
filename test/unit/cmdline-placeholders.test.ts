import assert from 'node:assert/strict'
import { test } from 'node:test'
import { cmdlinePlaceholders, cmdlineValues, netmaskOf, parseCmdline, substituteCmdline } from '../../src/core/cmdline-placeholders.js'
import { UigniterError } from '../../src/core/errors.js'
import type { ImageManifest } from '../../src/core/image.js'
import { parseBuildSpec } from '../../src/guest/image-builder.js'
import { kernelCommandLine } from '../../src/vmm/qemu/command-line.js'
import { USER_NETWORK } from '../../src/core/ports/vmm-driver.js'

const throwsCode = (fn: () => unknown, code: string, ...fragments: string[]): void => {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof UigniterError, String(err))
    assert.equal(err.code, code, err.message)
    for (const f of fragments) assert.ok(err.message.includes(f), `"${err.message}" should mention "${f}"`)
    return true
  })
}

const vm = cmdlineValues({ address: '10.77.0.9', prefix: 24, gateway: '10.77.0.1', dns: ['10.255.255.53', '9.9.9.9'] }, 'web-1')

test('OSv\'s network flags take the VM\'s address, netmask, gateway and first nameserver', () => {
  assert.equal(substituteCmdline('--ip=eth0,{ip},{netmask} --defaultgw={gateway} --nameserver={dns} /app', vm),
    '--ip=eth0,10.77.0.9,255.255.255.0 --defaultgw=10.77.0.1 --nameserver=10.255.255.53 /app')
  assert.equal(substituteCmdline('ip={ip}/{prefix} host={hostname} {ip}', vm), 'ip=10.77.0.9/24 host=web-1 10.77.0.9')
  assert.equal(substituteCmdline('no placeholders at all', vm), 'no placeholders at all')
  assert.equal(substituteCmdline('', vm), '')
})

test('{{ and }} are literal braces, and a doubled brace never opens a placeholder', () => {
  assert.equal(substituteCmdline('a={{ip}} b={{{ip}}} c=}}{{', vm), 'a={ip} b={10.77.0.9} c=}{')
  assert.deepEqual(cmdlinePlaceholders('{{ip}} {dns} {ip} {dns}'), ['dns', 'ip'])
})

test('an unknown placeholder or a lone brace is refused, naming it and where it is', () => {
  throwsCode(() => parseCmdline('console=ttyS0 --ip={ipaddr}'), 'UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER', '{ipaddr}', 'character 20', '{ip}', '{{')
  throwsCode(() => parseCmdline('x={foo}'), 'UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER', 'unknown placeholder {foo}')
  throwsCode(() => parseCmdline('x={IP}'), 'UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER', '{IP}')
  throwsCode(() => parseCmdline('x={'), 'UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER', 'opens no placeholder')
  throwsCode(() => parseCmdline('x={ip y=}'), 'UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER', 'opens no placeholder')
  throwsCode(() => parseCmdline('x=}'), 'UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER', 'lone "}" at character 3')
  throwsCode(() => parseCmdline('x={}'), 'UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER', 'unknown placeholder {}')
})

test('a placeholder without a value for this VM fails the launch rather than boot an empty address', () => {
  throwsCode(() => substituteCmdline('--ip={ip}', cmdlineValues(undefined, 'x')), 'UIG_ERR_VM_CMDLINE_INVALID', '{ip}', 'no network')
  throwsCode(() => substituteCmdline('--nameserver={dns}', cmdlineValues({ address: '10.77.0.2', prefix: 24, gateway: '10.77.0.1', dns: [] }, 'x')),
    'UIG_ERR_VM_CMDLINE_INVALID', '{dns}', 'nameserver')
  // Only the ones used need a value.
  assert.equal(substituteCmdline('host={hostname}', cmdlineValues(undefined, 'solo')), 'host=solo')
})

test('netmasks of every prefix', () => {
  assert.equal(netmaskOf(0), '0.0.0.0')
  assert.equal(netmaskOf(16), '255.255.0.0')
  assert.equal(netmaskOf(29), '255.255.255.248')
  assert.equal(netmaskOf(32), '255.255.255.255')
  assert.throws(() => netmaskOf(33), RangeError)
})

test('the driver fills a unikernel\'s command line, and leaves our own images\' alone', () => {
  const digest = `sha256:${'a'.repeat(64)}`
  const unikernel: ImageManifest = {
    schemaVersion: 1, name: 'osv', tag: 'latest', digest, size: 1, format: 'unikernel',
    kernel: { source: 'image', version: 'unikernel', blob: { digest, size: 1 } },
    init: null, cmdline: '--ip=eth0,{ip},{netmask} --defaultgw={gateway} --nameserver={dns} --hostname={hostname} /hello',
    entrypoint: [], env: {}, workdir: '/', vcpus: 1, memoryMiB: 64, ports: [],
    machine: { type: 'q35', transport: 'pci' }, createdAt: new Date(0).toISOString()
  }
  const spec = { manifest: unikernel, kernelPath: '/k', accel: 'tcg' as const, vcpus: 1, memoryMiB: 64, console: { kind: 'stdio' as const }, network: { mode: 'user' as const, forwards: [] } }
  assert.equal(kernelCommandLine({ ...spec, guestNetwork: USER_NETWORK, hostname: 'osv-1' }),
    '--ip=eth0,10.0.2.15,255.255.255.0 --defaultgw=10.0.2.2 --nameserver=10.0.2.3 --hostname=osv-1 /hello')
  throwsCode(() => kernelCommandLine({ ...spec, network: { mode: 'none' } }), 'UIG_ERR_VM_CMDLINE_INVALID', '{ip}')
  const ours = kernelCommandLine({ ...spec, manifest: { ...unikernel, init: { version: 1, digest }, cmdline: 'root=/dev/vda' }, guestNetwork: USER_NETWORK })
  assert.ok(ours.includes('uigniter.ip=10.0.2.15/24'))
})

test('a build spec with an unknown placeholder is refused at build time, before any file is read', () => {
  throwsCode(() => parseBuildSpec({ name: 'osv', source: { kind: 'unikernel', kernel: '/nonexistent', cmdline: '--ip=eth0,{ip},{mask}' } }),
    'UIG_ERR_IMAGE_CMDLINE_PLACEHOLDER', '{mask}')
  const ok = parseBuildSpec({ name: 'osv', source: { kind: 'unikernel', kernel: '/k', cmdline: '--ip=eth0,{ip},{netmask} json={{"a":1}}' } })
  assert.equal(ok.source.kind === 'unikernel' ? ok.source.cmdline : '', '--ip=eth0,{ip},{netmask} json={{"a":1}}')
})
