import { formatBytes, formatDuration } from '../core/progress.js'
import type { DebianCloudKernelInfo } from '../guest/debian-cloud-kernel.js'
import type { KernelInfo } from '../guest/kernel-cache.js'
import type { Command } from './args.js'
import { createContext } from './context.js'

/** Human-readable lines for `kernel info`, for either kernel source. */
function describe (info: KernelInfo | DebianCloudKernelInfo): string {
  if (info.source === 'build') {
    return `key:        ${info.key}\nsource:     build (linux-source-6.1 ${info.version})\npath:       ${info.path}\nsize:       ${formatBytes(info.size)}\nbuilt:      ${info.builtAt} in ${formatDuration(info.buildSeconds * 1000)}`
  }
  return [
    `key:        ${info.key}`,
    `source:     debian-cloud (${info.package} ${info.packageVersion}, from ${info.bzImage})`,
    `path:       ${info.path}`,
    `size:       ${formatBytes(info.size)}`,
    `machine:    ${info.machines.map((m) => `${m.type}/${m.transport}`).join(', ')}`,
    `modules:    ${info.modules.length}, loaded by the init in this order:`,
    ...info.modules.map((m) => `  ${m.guestPath}`),
    `built in:   ${info.builtin.length > 0 ? info.builtin.join(', ') : '(none of the drivers asked for)'}`,
    `prepared:   ${info.preparedAt}`
  ].join('\n')
}

export const kernelCommands: Command[] = [
  {
    name: 'kernel build',
    summary: 'Build the guest kernel (a few minutes, once per machine), or with kernel.source "debian-cloud" prepare Debian\'s cloud kernel.',
    usage: 'uigniter kernel build [--force]',
    options: { force: { type: 'boolean' } },
    help: [
      '--force   rebuild (or re-prepare) even when the kernel is cached',
      'kernel.source "build": our kernel from linux-source-6.1 and src/guest/kernel/config-fragment.',
      'kernel.source "debian-cloud": checks that linux-image-cloud-amd64 is installed, extracts its',
      'vmlinux and collects the virtio modules the guest loads (a few seconds).'
    ],
    run: async (values) => {
      const { kernels } = createContext()
      const cached = values.force === true ? undefined : await kernels.find()
      if (cached !== undefined) {
        console.log(`kernel ${cached.key} is cached at ${cached.path}`)
        return 0
      }
      const info = await kernels.build({ force: values.force === true })
      if (info.source === 'build') {
        console.log(`built kernel ${info.key} in ${formatDuration(info.buildSeconds * 1000)}: ${info.path} (${formatBytes(info.size)})`)
      } else {
        console.log(`prepared Debian's cloud kernel ${info.key}: ${info.path} (${formatBytes(info.size)}), ${info.modules.length} modules`)
      }
      return 0
    }
  },
  {
    name: 'kernel path',
    summary: 'Print the path of the guest kernel of kernel.source (fails when it is not built).',
    usage: 'uigniter kernel path',
    options: {},
    help: [],
    run: async () => {
      console.log((await createContext().kernels.get()).path)
      return 0
    }
  },
  {
    name: 'kernel info',
    summary: 'Describe the guest kernel of kernel.source: version, cache key, size, build time, modules.',
    usage: 'uigniter kernel info [--json]',
    options: { json: { type: 'boolean' } },
    help: ['--json   print JSON for scripts'],
    run: async (values) => {
      const info = await createContext().kernels.get()
      if (values.json === true) console.log(JSON.stringify(info, null, 2))
      else console.log(describe(info))
      return 0
    }
  }
]
