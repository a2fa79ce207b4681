import { readFile } from 'node:fs/promises'
import { UigniterError, hasErrno } from '../core/errors.js'
import { Progress } from '../core/progress.js'
import type { AppFile, ServiceStatus } from '../core/service.js'
import { parseAppText } from '../service/service-spec.js'
import type { RegistryEntry } from '../service/service-manager.js'
import { parseReference } from '../oci/reference.js'
import { daemonClient, type ApiClient, type ServerSentEvent } from './api-client.js'
import { parseIntFlag, printTable, type Command } from './args.js'
import { REGISTRY_HELP, REGISTRY_OPTIONS, isRegistryReference, localNameFor, pullImage, registryFlags, type RegistryFlags } from './image-commands.js'

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

/** The deadline passed with the services as they were last read. */
class NotSettled extends Error {
  constructor (readonly services: ServiceStatus[]) {
    super('not settled')
  }
}

/** A stream that ends this often in a row is not one to follow (a daemon restarting over and over). */
const MAX_STREAM_ENDS = 5

/**
 * Applies the application file and waits until its services settle,
 * following the daemon's events: the services are read again only when one
 * of them had an event (a replica started, passed its health check, ended,
 * was drained, the service scaled), never on a timer. The stream is opened
 * before the file is applied, so that no event of the change is missed. The
 * events say what happened, not the counts: /v1/events has no event for "the
 * service has all its replicas ready", so the state is read once per batch
 * of events. Throws NotSettled at the deadline.
 */
async function untilSettled (client: ApiClient, file: AppFile, timeoutS: number, onProgress: (services: ServiceStatus[]) => void): Promise<ServiceStatus[]> {
  const abort = new AbortController()
  let names: Set<string> | undefined
  let changed = false
  let wake: (() => void) | undefined
  let streamEnded = false
  let streamError: Error | undefined
  let ends = 0
  const onEvent = (event: ServerSentEvent): void => {
    if (!event.type.startsWith('service.')) return
    // Before the file is applied its services are not known yet: any service's event counts.
    if (names !== undefined && !names.has(serviceOf(event))) return
    changed = true
    wake?.()
  }
  const follow = async (): Promise<void> => {
    const { ended } = await client.followEvents('/v1/events', onEvent, abort.signal)
    ended.then(() => { streamEnded = true }, (err: unknown) => { streamError = err as Error }).finally(() => wake?.())
  }
  let timer: NodeJS.Timeout | undefined
  let timedOut = false
  try {
    await follow()
    let services = await client.call<ServiceStatus[]>('PUT', `/v1/apps/${enc(file.app)}`, file)
    names = new Set(services.map((s) => s.spec.name))
    timer = setTimeout(() => { timedOut = true; wake?.() }, timeoutS * 1000)
    while (!settled(services)) {
      onProgress(services)
      await new Promise<void>((resolve) => {
        wake = resolve
        if (changed || timedOut || streamEnded || streamError !== undefined) resolve()
      })
      wake = undefined
      if (timedOut) throw new NotSettled(services)
      if (streamError !== undefined) throw streamError
      if (streamEnded) {
        // The daemon closed the stream (it restarted?): follow a new one, and read what may have been missed.
        if (++ends >= MAX_STREAM_ENDS) throw new UigniterError('UIG_ERR_DAEMON_UNREACHABLE', `the daemon's event stream ended ${ends} times while waiting for ${file.app}`)
        streamEnded = false
        await follow()
      }
      changed = false
      services = await client.call<ServiceStatus[]>('GET', `/v1/services?app=${enc(file.app)}`)
    }
    return services
  } finally {
    clearTimeout(timer)
    abort.abort()
  }
}

/** The service an event of the daemon's is about ('' when its data says none). */
function serviceOf (event: ServerSentEvent): string {
  try {
    const data = JSON.parse(event.data) as { service?: unknown }
    return typeof data.service === 'string' ? data.service : ''
  } catch {
    return ''
  }
}

/**
 * Pulls the images the file names by registry reference (`localhost:5000/redis:7`),
 * each once, as `uigniter image pull` would (an image already made from the
 * same manifest is kept), and returns the file with those services naming
 * the local images the pulls made: the daemon knows only local images, and
 * a service's spec keeps the same image name from one `up` to the next, so
 * an unchanged file changes nothing. Local names are left as they are. Says
 * what each pull did on stderr, so that `--json` output stays JSON.
 */
async function withPulledImages (file: AppFile, flags: RegistryFlags): Promise<AppFile> {
  const refs = [...new Set(file.services.map((s) => s.image).filter((image): image is string => image !== undefined && isRegistryReference(image)))]
  // Checked before any pull: two references that would make one local image would each replace the other's.
  const byName = new Map<string, string>()
  for (const ref of refs) {
    const name = localNameFor(parseReference(ref))
    const other = byName.get(name)
    if (other !== undefined) throw new UigniterError('UIG_ERR_CLI_USAGE', `${other} and ${ref} would both be pulled as the local image ${name}: pull one with "uigniter image pull -t NAME:TAG" and name that in the file`)
    byName.set(name, ref)
  }
  const local = new Map<string, string>()
  for (const ref of refs) {
    const { manifest, line } = await pullImage(ref, flags)
    process.stderr.write(`${line}\n`)
    local.set(ref, `${manifest.name}:${manifest.tag}`)
  }
  if (local.size === 0) return file
  return { ...file, services: file.services.map((s) => s.image !== undefined && local.has(s.image) ? { ...s, image: local.get(s.image) } : s) }
}

export const serviceCommands: Command[] = [
  {
    name: 'up',
    summary: 'Bring an application\'s services up (or to its file\'s new state), and wait until they are ready.',
    usage: 'uigniter up [FILE] [--detach] [--timeout S] [--insecure] [--credentials FILE] [--json]',
    options: { detach: { type: 'boolean', short: 'd' }, timeout: { type: 'string' }, json: { type: 'boolean' }, ...REGISTRY_OPTIONS },
    help: [
      'FILE          the application file, YAML or JSON (default ./uigniter.yaml); see docs/services.md',
      '--detach, -d  return once the daemon took the file, without waiting for replicas',
      '--timeout S   how long to wait for every service to be ready (default 300)',
      'An image given as a registry reference (HOST[:PORT]/name[:tag]) is pulled first, as `image pull` does:',
      ...REGISTRY_HELP
    ],
    run: async (values, positionals) => {
      if (positionals.length > 1) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter up [FILE]')
      const timeoutS = values.timeout !== undefined ? parseIntFlag(values.timeout as string, '--timeout', 1, 3600) : 300
      const read = await readAppFile(positionals[0] ?? DEFAULT_FILE)
      // The daemon first: a pull of minutes is not wasted on a daemon that is not there.
      const client = await daemonClient()
      const file = await withPulledImages(read, registryFlags(values))
      let services: ServiceStatus[]
      if (values.detach === true) {
        services = await client.call<ServiceStatus[]>('PUT', `/v1/apps/${enc(file.app)}`, file)
      } else {
        const progress = new Progress(`up ${file.app}`)
        try {
          services = await untilSettled(client, file, timeoutS, (s) => progress.update(s.map((x) => `${x.spec.name} ${x.ready}/${x.desired}`).join(', ')))
        } catch (err) {
          progress.done()
          if (err instanceof NotSettled) {
            printServices(err.services)
            throw new UigniterError('UIG_ERR_VM_TIMEOUT', `application ${file.app} was not ready within ${timeoutS} s; "uigniter service ls" and the daemon's events say why`)
          }
          throw err
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
    help: ['--json   print JSON', 'In a cluster, NODE is the node each endpoint runs on'],
    run: async (values, positionals) => {
      if (positionals.length > 1) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter registry [SERVICE]')
      const query = positionals[0] !== undefined ? `?service=${enc(positionals[0])}` : ''
      const entries = await (await daemonClient()).call<RegistryEntry[]>('GET', `/v1/registry${query}`)
      if (values.json === true) console.log(JSON.stringify(entries, null, 2))
      else {
        // A cluster's endpoints say where they run; a single host's do not, and get no NODE column.
        const withNode = entries.some((e) => e.endpoints.some((p) => p.node !== undefined))
        const node = (cells: string[], value: string): string[] => withNode ? [...cells.slice(0, 3), value, ...cells.slice(3)] : cells
        printTable(node(['SERVICE', 'ENDPOINT', 'VM', 'ADDRESS', 'GEN', 'HEALTH', 'WEIGHT', 'PRIORITY', 'SINCE'], 'NODE'),
          entries.flatMap((e) => e.endpoints.map((p) => node([e.service, p.id, p.vm ?? '-', p.host, String(p.generation), p.health, String(p.weight), String(p.priority), p.since], p.node ?? '-'))))
      }
      return 0
    }
  }
]
