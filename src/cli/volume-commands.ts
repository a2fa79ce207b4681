import { UigniterError } from '../core/errors.js'
import { formatBytes } from '../core/progress.js'
import type { Volume } from '../core/volume.js'
import { daemonClient } from './api-client.js'
import { printTable, type Command } from './args.js'

const enc = encodeURIComponent
const MiB = 1024 * 1024
const UNIT_MIB: Record<string, number> = { m: 1, g: 1024, t: 1024 * 1024 }

/**
 * A volume's size → MiB: `512M`, `10G`, `1T` (with or without `iB`/`B`, any
 * case), `1.5G` when it comes to whole MiB, or a bare number of MiB. Zero and
 * anything else are refused here; the daemon checks the range (16 MiB to 16 TiB).
 *
 * @example parseVolumeSize('10G') // 10240
 */
export function parseVolumeSize (text: string, flag = '--size'): number {
  const m = /^(\d+(?:\.\d+)?)([mgt](?:i?b)?)?$/i.exec(text.trim())
  const mib = m === null ? NaN : Number(m[1]) * (UNIT_MIB[(m[2] ?? 'm')[0]?.toLowerCase() ?? 'm'] ?? NaN)
  if (!Number.isSafeInteger(mib) || mib <= 0) {
    throw new UigniterError('UIG_ERR_CLI_USAGE', `${flag} must be a size like 512M, 10G or 1T, or a number of MiB, and more than 0 (whole MiB), not "${text}"`)
  }
  return mib
}

/** `K=V` pairs from repeated `--label` flags; the daemon checks the keys' characters. */
export function parseLabels (list: string[] | undefined): Record<string, string> {
  const labels: Record<string, string> = {}
  for (const item of list ?? []) {
    const eq = item.indexOf('=')
    if (eq <= 0) throw new UigniterError('UIG_ERR_CLI_USAGE', `--label takes KEY=VALUE, not "${item}"`)
    labels[item.slice(0, eq)] = item.slice(eq + 1)
  }
  return labels
}

/** Who holds a volume, as `ls` shows it: VM names, `(ro)` after a read-only attachment. */
function attachedTo (volume: Volume): string {
  if (volume.attachments.length === 0) return '-'
  return volume.attachments.map((a) => `${a.vmName}${a.readOnly ? ' (ro)' : ''}`).join(', ')
}

function printVolumes (volumes: Volume[]): void {
  printTable(['NAME', 'SIZE', 'USED', 'ALLOCATED', 'ATTACHED-TO', 'NODE'],
    volumes.map((v) => [v.name, formatBytes(v.sizeMiB * MiB), v.usedBytes === null ? '-' : formatBytes(v.usedBytes), formatBytes(v.allocatedBytes), attachedTo(v), v.node ?? '-']))
}

function one (positionals: string[], usage: string): string {
  const [name] = positionals
  if (positionals.length !== 1 || name === undefined) throw new UigniterError('UIG_ERR_CLI_USAGE', `usage: ${usage}`)
  return name
}

export const volumeCommands: Command[] = [
  {
    name: 'volume create',
    summary: 'Create a persistent volume (a sparse ext4 file on the host); attach it with run -v NAME:/PATH.',
    usage: 'uigniter volume create NAME --size SIZE [--label K=V]... [--json]',
    options: { size: { type: 'string' }, label: { type: 'string', multiple: true }, json: { type: 'boolean' } },
    help: [
      '--size SIZE     the block device\'s size: 512M, 10G, 1T, or MiB (16M to 16T); the host file is sparse,',
      '                so it takes only what the filesystem holds',
      '--label K=V     a label (repeatable)',
      '--json          print the volume as JSON'
    ],
    run: async (values, positionals) => {
      const usage = 'uigniter volume create NAME --size SIZE [--label K=V]...'
      const name = one(positionals, usage)
      if (values.size === undefined) throw new UigniterError('UIG_ERR_CLI_USAGE', `--size is required\nusage: ${usage}`)
      const body = { name, sizeMiB: parseVolumeSize(values.size as string), labels: parseLabels(values.label as string[] | undefined) }
      const volume = await (await daemonClient()).call<Volume>('POST', '/v1/volumes', body)
      if (values.json === true) console.log(JSON.stringify(volume, null, 2))
      else printVolumes([volume])
      return 0
    }
  },
  {
    name: 'volume ls',
    summary: 'List volumes: size, what their filesystem uses, what they take on the host, the VMs they are attached to.',
    usage: 'uigniter volume ls [--json]',
    options: { json: { type: 'boolean' } },
    help: ['--json   print JSON', 'USED is what the filesystem said at its last write back to the disk; - when it cannot be read'],
    run: async (values) => {
      const volumes = await (await daemonClient()).call<Volume[]>('GET', '/v1/volumes')
      if (values.json === true) console.log(JSON.stringify(volumes, null, 2))
      else printVolumes(volumes)
      return 0
    }
  },
  {
    name: 'volume inspect',
    summary: 'Show a volume as JSON.',
    usage: 'uigniter volume inspect NAME',
    options: {},
    help: [],
    run: async (_values, positionals) => {
      const name = one(positionals, 'uigniter volume inspect NAME')
      console.log(JSON.stringify(await (await daemonClient()).call<Volume>('GET', `/v1/volumes/${enc(name)}`), null, 2))
      return 0
    }
  },
  {
    name: 'volume rm',
    summary: 'Delete volumes and their data (refused while a live VM has one attached).',
    usage: 'uigniter volume rm NAME...',
    options: {},
    help: [],
    run: async (_values, positionals) => {
      if (positionals.length === 0) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter volume rm NAME...')
      const api = await daemonClient()
      for (const name of positionals) {
        await api.call('DELETE', `/v1/volumes/${enc(name)}`)
        console.log(`removed volume ${name}`)
      }
      return 0
    }
  }
]
