import assert from 'node:assert/strict'
import { test } from 'node:test'
import { resolveModuleLoadOrder } from '../../src/guest/kernel-modules.js'

// A modules.dep in depmod's format, trimmed from Debian's cloud kernel, with
// one line's dependencies deliberately listed in an order that would be wrong
// to load as written (virtio_ring before virtio for virtio_blk).
const MODULES_DEP = [
  'kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko',
  'kernel/drivers/virtio/virtio_ring.ko:',
  'kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko',
  'kernel/drivers/virtio/virtio_pci_legacy_dev.ko:',
  'kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko',
  'kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko',
  'kernel/net/core/failover.ko:',
  'kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko',
  'kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko',
  ''
].join('\n')
const MODULES_BUILTIN = 'kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n'

test('modules come after everything they need, each once, whatever the order of a modules.dep line', () => {
  const { load, builtin, missing } = resolveModuleLoadOrder(MODULES_DEP, MODULES_BUILTIN, ['virtio_pci', 'virtio_net', 'virtio_blk', 'virtio-rng'])
  assert.deepEqual(builtin, [])
  assert.deepEqual(missing, [])
  assert.equal(new Set(load).size, load.length, 'no module twice')
  const depLines = new Map(MODULES_DEP.split('\n').filter((l) => l !== '').map((l) => {
    const [path = '', deps = ''] = l.split(':')
    return [path, deps.trim().split(/\s+/).filter((d) => d !== '')]
  }))
  for (const [i, path] of load.entries()) {
    for (const dep of depLines.get(path) ?? []) assert.ok(load.indexOf(dep) >= 0 && load.indexOf(dep) < i, `${dep} must load before ${path}`)
  }
  assert.ok(load.includes('kernel/drivers/block/virtio_blk.ko.xz'), 'compressed modules are found by their plain name')
  assert.ok(load.includes('kernel/drivers/char/hw_random/virtio-rng.ko'), '"-" and "_" name the same module')
})

test('built-in drivers are reported, not loaded; unknown ones are reported missing', () => {
  const { load, builtin, missing } = resolveModuleLoadOrder(MODULES_DEP, MODULES_BUILTIN, ['ext4', '9pnet_virtio', 'virtio'])
  assert.deepEqual(load, ['kernel/drivers/virtio/virtio_ring.ko', 'kernel/drivers/virtio/virtio.ko'])
  assert.deepEqual(builtin, ['ext4'])
  assert.deepEqual(missing, ['9pnet_virtio'])
})
