import { UigniterError } from '../core/errors.js'
import { formatBytes } from '../core/progress.js'
import type { ImageManifest } from '../core/image.js'
import type { Vm } from '../core/vm.js'
import { VOLUME_NAME } from '../core/volume.js'
import { ApiClient, daemonClient } from './api-client.js'
import { parseEnv, parseIntFlag, parseMiB, printTable, type Command } from './args.js'
import { clusterNodes, parseNodeName } from './node-commands.js'

function ports (vm: Vm): string {
  return vm.publish.map((p) => `${p.hostAddress}:${p.hostPort}->${p.guestPort}`).join(', ')
}

function ago (iso: string | null): string {
  if (iso === null) return '-'
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000)
  return s < 60 ? `${s}s ago` : s < 3600 ? `${Math.round(s / 60)}m ago` : `${Math.round(s / 3600)}h ago`
}

function exitText (vm: Vm): string {
  if (vm.exit === null) return vm.state
  const code = vm.exit.appExitCode !== undefined ? ` (${vm.exit.appExitCode})` : vm.exit.appSignal !== undefined ? ` (signal ${vm.exit.appSignal})` : ''
  return `${vm.state}: ${vm.exit.reason}${code}`
}

function requireSome (positionals: string[], usage: string): string[] {
  if (positionals.length === 0) throw new UigniterError('UIG_ERR_CLI_USAGE', `usage: ${usage}`)
  return positionals
}

/** Does each of `ids` in turn; prints what it did. */
function eachVm (verb: string, action: (api: ApiClient, id: string, values: Record<string, unknown>) => Promise<Vm>): Command['run'] {
  return async (values, positionals) => {
    const api = await daemonClient()
    for (const id of requireSome(positionals, `uigniter ${verb} VM...`)) {
      const vm = await action(api, id, values)
      console.log(`${vm.name}  ${exitText(vm)}`)
    }
    return 0
  }
}

const enc = encodeURIComponent
/** The states GET /v1/vms lists without all=true. */
const LIVE = new Set<Vm['state']>(['starting', 'running', 'paused', 'stopping'])

export const vmCommands: Command[] = [
  {
    name: 'run',
    summary: 'Create a VM from an image (or clone a template) and start it; without -d, follow its console until it ends.',
    positionalTail: true,
    usage: 'uigniter run [-d] [--name NAME] [--node NODE] [--cpus N] [--memory M] [-p HOST:GUEST]... [-e K=V]... [--network bridge|user|none] [--overlay SIZE] [-v /HOST/DIR:GUEST[:rw] | -v VOLUME:GUEST[:ro]]... (IMAGE [ARGS...] | --template TEMPLATE)',
    options: {
      detach: { type: 'boolean', short: 'd' },
      template: { type: 'string' },
      name: { type: 'string' },
      node: { type: 'string' },
      cpus: { type: 'string' },
      memory: { type: 'string' },
      publish: { type: 'string', short: 'p', multiple: true },
      env: { type: 'string', short: 'e', multiple: true },
      network: { type: 'string' },
      overlay: { type: 'string' },
      volume: { type: 'string', short: 'v', multiple: true },
      json: { type: 'boolean' }
    },
    help: [
      '-d, --detach          print the VM id and return',
      '--name NAME           a unique name (default: IMAGE-<id>)',
      '--node NODE           a cluster only: run it on this node (default: the scheduler picks one)',
      '--cpus N, --memory M  resources (memory in MiB, or 512M, 1G); default: the image\'s',
      '-p, --publish H:G     publish host port H (on 127.0.0.1; or ADDR:H:G) to the VM\'s port G',
      '-e, --env K=V         environment for the app (repeatable)',
      '--network MODE        bridge (default as root), user, none',
      '--overlay SIZE        a writable overlay over the read-only root (MiB, or 512M)',
      '-v, --volume SRC:G    SRC an absolute path /H: share host directory /H at G (9p), read-only unless :rw;',
      '                      SRC a volume name V: attach volume V (see "uigniter volume") at G, read-write unless :ro',
      '--template T          clone template T instead of booting an image (see "uigniter template")',
      'ARGS                  replace the image\'s app arguments'
    ],
    run: async (values, positionals) => {
      const body: Record<string, unknown> = { env: parseEnv(values.env as string[] | undefined) }
      if (values.template !== undefined) {
        if (positionals.length > 0) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter run [options] --template TEMPLATE (a clone runs its template\'s image and arguments)')
        body.template = values.template
      } else {
        const [image, ...args] = requireSome(positionals, 'uigniter run [options] IMAGE [ARGS...]')
        body.image = image
        if (args.length > 0) body.args = args
      }
      if (values.name !== undefined) body.name = values.name
      if (values.node !== undefined) body.node = parseNodeName(values.node as string, '--node')
      if (values.cpus !== undefined) body.vcpus = parseIntFlag(values.cpus as string, '--cpus', 1, 64)
      if (values.memory !== undefined) body.memoryMiB = parseMiB(values.memory as string, '--memory')
      if (values.network !== undefined) body.network = values.network
      if (values.overlay !== undefined) body.overlaySizeMiB = parseMiB(values.overlay as string, '--overlay')
      body.publish = ((values.publish as string[] | undefined) ?? []).map(parsePublish)
      const mounts = ((values.volume as string[] | undefined) ?? []).map(parseVolumeFlag)
      body.shares = mounts.flatMap((m) => m.share !== undefined ? [m.share] : [])
      const volumes = mounts.flatMap((m) => m.volume !== undefined ? [m.volume] : [])
      // Sent only when there are some, so that a daemon without volumes still takes the request.
      if (volumes.length > 0) body.volumes = volumes
      const api = await daemonClient()
      const vm = await api.call<Vm>('POST', '/v1/vms', body)
      if (values.json === true) console.log(JSON.stringify(vm, null, 2))
      else if (values.detach === true) console.log(vm.id)
      if (values.detach === true || values.json === true) return 0
      await api.stream(`/v1/vms/${enc(vm.id)}/logs?follow=true&tail=0`, (text) => process.stdout.write(text))
      const ended = await api.call<Vm>('GET', `/v1/vms/${enc(vm.id)}`)
      process.stderr.write(`uigniter: ${ended.name} ${exitText(ended)}${ended.exit !== null ? `: ${ended.exit.detail}` : ''}\n`)
      return ended.exit?.appExitCode ?? (ended.exit?.reason === 'app-exited' ? 0 : 1)
    }
  },
  {
    name: 'ps',
    summary: 'List running VMs (-a: all); in a cluster, those of every node, with their node.',
    usage: 'uigniter ps [-a] [--json]',
    options: { all: { type: 'boolean', short: 'a' }, json: { type: 'boolean' } },
    help: ['-a, --all   include VMs that ended', '--json      print JSON', 'In a cluster, NODE says where each VM runs; nodes that do not answer are named on stderr'],
    run: async (values) => {
      const api = await daemonClient()
      const nodes = await clusterNodes(api)
      let vms: Vm[]
      if (nodes === undefined) {
        vms = await api.call<Vm[]>('GET', `/v1/vms${values.all === true ? '?all=true' : ''}`)
      } else {
        const cluster = await api.call<{ vms: Vm[], unreachable: string[] }>('GET', '/v1/cluster/vms')
        if (cluster.unreachable.length > 0) process.stderr.write(`uigniter: warning: node${cluster.unreachable.length === 1 ? '' : 's'} ${cluster.unreachable.join(', ')} did not answer: ${cluster.unreachable.length === 1 ? 'its' : 'their'} VMs are not listed\n`)
        // The cluster's list holds ended VMs too: without -a, only the live states /v1/vms lists.
        vms = values.all === true ? cluster.vms : cluster.vms.filter((vm) => LIVE.has(vm.state))
      }
      if (values.json === true) { console.log(JSON.stringify(vms, null, 2)); return 0 }
      const node = (cells: string[], value: string): string[] => nodes !== undefined ? [...cells.slice(0, 2), value, ...cells.slice(2)] : cells
      printTable(node(['ID', 'NAME', 'IMAGE', 'STATE', 'IP', 'PORTS', 'STARTED AS', 'CREATED'], 'NODE'),
        vms.map((vm) => node([vm.id.slice(0, 12), vm.name, vm.image, exitText(vm), vm.exit === null ? vm.ipAddress ?? '-' : '-', ports(vm),
          vm.template !== null ? `clone of ${vm.template}` : vm.startPath, ago(vm.createdAt)], vm.node ?? '-')))
      return 0
    }
  },
  {
    name: 'logs',
    summary: 'Show a VM\'s console (-f: follow).',
    usage: 'uigniter logs [-f] [--tail BYTES] VM',
    options: { follow: { type: 'boolean', short: 'f' }, tail: { type: 'string' } },
    help: ['-f, --follow   keep printing until the VM ends', '--tail BYTES   how much of the end to show (default 65536)'],
    run: async (values, positionals) => {
      const [id] = requireSome(positionals, 'uigniter logs [-f] VM')
      const tail = values.tail === undefined ? 65536 : parseIntFlag(values.tail as string, '--tail', 0, 16 * 1024 * 1024)
      const api = await daemonClient()
      const path = `/v1/vms/${enc(id ?? '')}/logs?tail=${tail}${values.follow === true ? '&follow=true' : ''}`
      await api.stream(path, (text) => process.stdout.write(text))
      return 0
    }
  },
  {
    name: 'stop',
    summary: 'Stop VMs gracefully: SIGTERM to the app, then QMP quit, then SIGKILL.',
    usage: 'uigniter stop [-t SECONDS] VM...',
    options: { time: { type: 'string', short: 't' } },
    help: ['-t, --time SECONDS   grace period before escalating (default 10)'],
    run: eachVm('stop', async (api, id, values) => {
      const seconds = values.time === undefined ? 10 : parseIntFlag(values.time as string, '--time', 0, 600)
      return await api.call<Vm>('POST', `/v1/vms/${enc(id)}/stop?timeoutMs=${seconds * 1000}`)
    })
  },
  {
    name: 'kill',
    summary: 'Kill VMs at once (SIGKILL to QEMU).',
    usage: 'uigniter kill VM...',
    options: {},
    help: [],
    run: eachVm('kill', async (api, id) => await api.call<Vm>('POST', `/v1/vms/${enc(id)}/kill`))
  },
  {
    name: 'pause',
    summary: 'Pause VMs (their vCPUs stop; memory stays).',
    usage: 'uigniter pause VM...',
    options: {},
    help: [],
    run: eachVm('pause', async (api, id) => await api.call<Vm>('POST', `/v1/vms/${enc(id)}/pause`))
  },
  {
    name: 'resume',
    summary: 'Resume paused VMs.',
    usage: 'uigniter resume VM...',
    options: {},
    help: [],
    run: eachVm('resume', async (api, id) => await api.call<Vm>('POST', `/v1/vms/${enc(id)}/resume`))
  },
  {
    name: 'rm',
    summary: 'Remove VMs and their state (-f: kill running ones first).',
    usage: 'uigniter rm [-f] VM...',
    options: { force: { type: 'boolean', short: 'f' } },
    help: ['-f, --force   remove running VMs too (they are killed)'],
    run: eachVm('rm', async (api, id, values) => await api.call<Vm>('DELETE', `/v1/vms/${enc(id)}${values.force === true ? '?force=true' : ''}`))
  },
  {
    name: 'inspect',
    summary: 'Print VMs as JSON, or how each one started, step by step (--steps).',
    usage: 'uigniter inspect [--steps] VM...',
    options: { steps: { type: 'boolean' } },
    help: ['--steps   print each start step and its duration (the plan: cold, prespawned, booted, clone, adopted; a pool claim\'s steps come last)'],
    run: async (values, positionals) => {
      const api = await daemonClient()
      const vms = []
      for (const id of requireSome(positionals, 'uigniter inspect VM...')) vms.push(await api.call<Vm>('GET', `/v1/vms/${enc(id)}`))
      if (values.steps !== true) {
        console.log(JSON.stringify(vms.length === 1 ? vms[0] : vms, null, 2))
        return 0
      }
      for (const vm of vms) {
        const t = vm.startTimings
        if (t === null) {
          console.log(`${vm.name}: no start recorded (${vm.state})`)
          continue
        }
        console.log(`${vm.name}: ${t.plan} start, ${t.totalMs} ms${t.claimMs !== undefined ? ` (claimed in ${t.claimMs} ms)` : ''}`)
        printTable(['STEP', 'MS', 'GUEST MS'], t.steps.map((step) => [step.name, step.ms.toFixed(1), step.guestMs?.toFixed(1) ?? '']))
      }
      return 0
    }
  },
  {
    name: 'images',
    summary: 'List the daemon\'s images.',
    usage: 'uigniter images [--json]',
    options: { json: { type: 'boolean' } },
    help: ['--json   print the manifests as JSON'],
    run: async (values) => {
      const images = await (await daemonClient()).call<ImageManifest[]>('GET', '/v1/images')
      if (values.json === true) console.log(JSON.stringify(images, null, 2))
      else printTable(['NAME', 'TAG', 'DIGEST', 'FORMAT', 'SIZE'], images.map((m) => [m.name, m.tag, m.digest.slice(7, 19), m.format, formatBytes(m.size)]))
      return 0
    }
  },
  {
    name: 'info',
    summary: 'Show the daemon: version, accelerator and why, network, the API\'s and the gateway\'s addresses, data directory.',
    usage: 'uigniter info [--json]',
    options: { json: { type: 'boolean' } },
    help: ['--json   print JSON'],
    run: async (values) => {
      const info = await (await daemonClient()).call<Record<string, unknown>>('GET', '/v1/info')
      if (values.json === true) { console.log(JSON.stringify(info, null, 2)); return 0 }
      const accel = info.accel as { accel: string, reason: string }
      const net = info.network as Record<string, string>
      const api = info.api as { socket: string, listen: string }
      const gw = info.gateway as { address: string, httpPort: number, guestAddress: string }
      console.log([
        `version:      ${String(info.version)}`,
        `accelerator:  ${accel.accel} (${accel.reason})`,
        `network:      ${net.mode}${net.bridge !== undefined ? ` on ${net.bridge} ${net.subnet}` : ''}${net.reason !== undefined ? ` (${net.reason})` : ''}`,
        `api:          http://${api.listen} and ${api.socket}`,
        `gateway:      http://${gw.address}:${gw.httpPort}/svc/NAME/ (guests: ${gw.guestAddress}:${gw.httpPort})`,
        `data dir:     ${String(info.dataDir)}`,
        `started:      ${String(info.startedAt)}`
      ].join('\n'))
      return 0
    }
  }
]

function parsePublish (text: string): { hostAddress: string, hostPort: number, guestPort: number } {
  const parts = text.split(':')
  if (parts.length < 2 || parts.length > 3) throw new UigniterError('UIG_ERR_CLI_USAGE', `--publish takes HOST:GUEST or ADDR:HOST:GUEST, not "${text}"`)
  const guest = parts.pop() ?? ''
  const host = parts.pop() ?? ''
  return { hostAddress: parts[0] ?? '127.0.0.1', hostPort: parseIntFlag(host, '--publish', 1, 65535), guestPort: parseIntFlag(guest, '--publish', 1, 65535) }
}

/**
 * `-v`: as Docker tells bind mounts from named volumes, an absolute source is
 * a host directory shared over 9p (read-only unless `:rw`, as it always was)
 * and a volume name is a persistent volume (read-write unless `:ro`).
 *
 * @example parseVolumeFlag('data:/var/lib/app') // { volume: { name: 'data', guestPath: '/var/lib/app', readOnly: false } }
 */
export function parseVolumeFlag (text: string): { share?: { hostPath: string, guestPath: string, readOnly: boolean }, volume?: { name: string, guestPath: string, readOnly: boolean } } {
  const m = /^([^:]+):(\/[^:]*)(?::(ro|rw))?$/.exec(text)
  const source = m?.[1] ?? ''
  const guestPath = m?.[2] ?? ''
  if (m !== null && source.startsWith('/')) return { share: { hostPath: source, guestPath, readOnly: m[3] !== 'rw' } }
  if (m !== null && VOLUME_NAME.test(source)) return { volume: { name: source, guestPath, readOnly: m[3] === 'ro' } }
  throw new UigniterError('UIG_ERR_CLI_USAGE', `--volume takes /HOST/DIR:/GUEST/DIR[:ro|rw] (a host directory, read-only unless :rw) or VOLUME:/GUEST/DIR[:ro|rw] (a volume, read-write unless :ro; names are lowercase letters, digits, . _ -), not "${text}"`)
}
