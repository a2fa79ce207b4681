import { readFile } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { UigniterError, hasErrno } from '../core/errors.js'
import { Progress } from '../core/progress.js'
import type { AppFile, ServiceStatus } from '../core/service.js'
import { parseAppText } from '../service/service-spec.js'
import type { RegistryEntry } from '../service/service-manager.js'
import { daemonClient } from './api-client.js'
import { parseIntFlag, printTable, type Command } from './args.js'

const DEFAULT_FILE = 'uigniter.yaml'
const enc = encodeURIComponent

/** Reads and checks an application file here, so that a mistake is reported with its line before anything is sent. */
async function readAppFile (path: string): Promise<AppFile> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    if (hasErrno(err, 'ENOENT')) throw new UigniterError('UIG_ERR_CLI_USAGE', `no application file at ${path}; give its path (default ./${DEFAULT_FILE})`)
    throw err
  }
  return parseAppText(text, path)
}

function printServices (services: ServiceStatus[]): void {
  printTable(['NAME', 'APP', 'IMAGE', 'GEN', 'READY', 'REPLICAS', 'START', 'STRATEGY', 'PORTS', 'IN FLIGHT', 'MESSAGE'],
    services.map((s) => [
      s.spec.name, s.app ?? '-', s.spec.image ?? '-', String(s.generation), `${s.ready}/${s.desired}`,
      `${s.spec.replicas.min}-${s.spec.replicas.max ?? s.spec.replicas.min}`, s.spec.startPath, s.spec.loadBalancing.strategy,
      s.spec.ports.map((p) => p.protocol === 'tcp' ? `${p.gatewayPort ?? '?'}→${p.port}/tcp` : `${p.port}/http`).join(','),
      String(s.inFlight), s.message ?? ''
    ]))
}

/** Every service has its desired replicas healthy, and none runs an old generation. */
function settled (services: ServiceStatus[]): boolean {
  return services.every((s) => s.ready >= s.desired &&
    s.endpoints.every((e) => e.vm === null || (e.generation === s.generation && e.health === 'healthy')))
}

export const serviceCommands: Command[] = [
  {
    name: 'up',
    summary: 'Bring an application\'s services up (or to its file\'s new state), and wait until they are ready.',
    usage: 'uigniter up [FILE] [--detach] [--timeout S] [--json]',
    options: { detach: { type: 'boolean', short: 'd' }, timeout: { type: 'string' }, json: { type: 'boolean' } },
    help: [
      'FILE          the application file, YAML or JSON (default ./uigniter.yaml); see docs/services.md',
      '--detach, -d  return once the daemon took the file, without waiting for replicas',
      '--timeout S   how long to wait for every service to be ready (default 300)'
    ],
    run: async (values, positionals) => {
      if (positionals.length > 1) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter up [FILE]')
      const timeoutS = values.timeout !== undefined ? parseIntFlag(values.timeout as string, '--timeout', 1, 3600) : 300
      const file = await readAppFile(positionals[0] ?? DEFAULT_FILE)
      const client = await daemonClient()
      let services = await client.call<ServiceStatus[]>('PUT', `/v1/apps/${enc(file.app)}`, file)
      if (values.detach !== true) {
        const progress = new Progress(`up ${file.app}`)
        const deadline = Date.now() + timeoutS * 1000
        while (!settled(services)) {
          if (Date.now() > deadline) {
            progress.done()
            printServices(services)
            throw new UigniterError('UIG_ERR_VM_TIMEOUT', `application ${file.app} was not ready within ${timeoutS} s; "uigniter service ls" and the daemon's events say why`)
          }
          progress.update(services.map((s) => `${s.spec.name} ${s.ready}/${s.desired}`).join(', '))
          await sleep(250)
          services = await client.call<ServiceStatus[]>('GET', `/v1/services?app=${enc(file.app)}`)
        }
        progress.done()
      }
      if (values.json === true) console.log(JSON.stringify(services, null, 2))
      else printServices(services)
      return 0
    }
  },
  {
    name: 'down',
    summary: 'Take an application\'s services down: routes removed, replicas stopped, their templates deleted.',
    usage: 'uigniter down [FILE | --app NAME]',
    options: { app: { type: 'string' } },
    help: ['FILE        the application file whose `app` to take down (default ./uigniter.yaml)', '--app NAME  the application by name, without its file'],
    run: async (values, positionals) => {
      if (positionals.length > 1 || (values.app !== undefined && positionals.length > 0)) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter down [FILE | --app NAME]')
      const app = values.app as string | undefined ?? (await readAppFile(positionals[0] ?? DEFAULT_FILE)).app
      const result = await (await daemonClient()).call<{ deleted: string[] }>('DELETE', `/v1/apps/${enc(app)}`)
      console.log(result.deleted.length === 0 ? `application ${app} has no services` : `took down ${app}: ${result.deleted.join(', ')}`)
      return 0
    }
  },
  {
    name: 'service ls',
    summary: 'List services: replicas ready of desired, start path, strategy, ports.',
    usage: 'uigniter service ls [--app NAME] [--json]',
    options: { app: { type: 'string' }, json: { type: 'boolean' } },
    help: [],
    run: async (values) => {
      const query = values.app !== undefined ? `?app=${enc(values.app as string)}` : ''
      const services = await (await daemonClient()).call<ServiceStatus[]>('GET', `/v1/services${query}`)
      if (values.json === true) console.log(JSON.stringify(services, null, 2))
      else printServices(services)
      return 0
    }
  },
  {
    name: 'service inspect',
    summary: 'Show a service as JSON: spec, generation, endpoints with their health.',
    usage: 'uigniter service inspect NAME',
    options: {},
    help: [],
    run: async (_values, positionals) => {
      if (positionals.length !== 1) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter service inspect NAME')
      console.log(JSON.stringify(await (await daemonClient()).call<ServiceStatus>('GET', `/v1/services/${enc(positionals[0] ?? '')}`), null, 2))
      return 0
    }
  },
  {
    name: 'service rm',
    summary: 'Delete one service (its replicas are stopped).',
    usage: 'uigniter service rm NAME',
    options: {},
    help: [],
    run: async (_values, positionals) => {
      if (positionals.length !== 1) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter service rm NAME')
      await (await daemonClient()).call('DELETE', `/v1/services/${enc(positionals[0] ?? '')}`)
      console.log(`removed service ${positionals[0] ?? ''}`)
      return 0
    }
  },
  {
    name: 'registry',
    summary: 'Where each service runs: its endpoints and their health, as the gateway routes them.',
    usage: 'uigniter registry [SERVICE] [--json]',
    options: { json: { type: 'boolean' } },
    help: [],
    run: async (values, positionals) => {
      if (positionals.length > 1) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter registry [SERVICE]')
      const query = positionals[0] !== undefined ? `?service=${enc(positionals[0])}` : ''
      const entries = await (await daemonClient()).call<RegistryEntry[]>('GET', `/v1/registry${query}`)
      if (values.json === true) console.log(JSON.stringify(entries, null, 2))
      else {
        printTable(['SERVICE', 'ENDPOINT', 'VM', 'ADDRESS', 'GEN', 'HEALTH', 'WEIGHT', 'PRIORITY', 'SINCE'],
          entries.flatMap((e) => e.endpoints.map((p) => [e.service, p.id, p.vm ?? '-', p.host, String(p.generation), p.health, String(p.weight), String(p.priority), p.since])))
      }
      return 0
    }
  }
]
