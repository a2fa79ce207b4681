import { formatBytes, formatDuration } from '../core/progress.js'
import type { Command } from './args.js'
import { createContext } from './context.js'

export const kernelCommands: Command[] = [
  {
    name: 'kernel build',
    summary: 'Build the guest kernel from Debian\'s linux-source-6.1 and our config fragment, once per machine (a few minutes).',
    usage: 'uigniter kernel build [--force]',
    options: { force: { type: 'boolean' } },
    help: ['--force   rebuild even when the kernel is cached'],
    run: async (values) => {
      const { kernels } = createContext()
      const cached = values.force === true ? undefined : await kernels.find()
      if (cached !== undefined) {
        console.log(`kernel ${cached.key} is cached at ${cached.path}`)
        return 0
      }
      const info = await kernels.build({ force: values.force === true })
      console.log(`built kernel ${info.key} in ${formatDuration(info.buildSeconds * 1000)}: ${info.path} (${formatBytes(info.size)})`)
      return 0
    }
  },
  {
    name: 'kernel path',
    summary: 'Print the path of the cached guest kernel (fails when it is not built).',
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
    summary: 'Describe the cached guest kernel: version, cache key, size and build time.',
    usage: 'uigniter kernel info [--json]',
    options: { json: { type: 'boolean' } },
    help: ['--json   print JSON for scripts'],
    run: async (values) => {
      const info = await createContext().kernels.get()
      if (values.json === true) console.log(JSON.stringify(info, null, 2))
      else {
        console.log(`key:        ${info.key}\nsource:     ${info.source} (linux-source-6.1 ${info.version})\npath:       ${info.path}\nsize:       ${formatBytes(info.size)}\nbuilt:      ${info.builtAt} in ${formatDuration(info.buildSeconds * 1000)}`)
      }
      return 0
    }
  }
]
