import { UigniterError } from '../core/errors.js'
import { formatBytes } from '../core/progress.js'
import type { TemplateInfo } from '../core/template.js'
import { daemonClient } from './api-client.js'
import { parseEnv, parseIntFlag, parseMiB, printTable, type Command } from './args.js'

function one (positionals: string[], usage: string): string {
  const [name] = positionals
  if (positionals.length !== 1 || name === undefined) throw new UigniterError('UIG_ERR_CLI_USAGE', `usage: ${usage}`)
  return name
}

function printTemplates (templates: TemplateInfo[]): void {
  printTable(['NAME', 'IMAGE', 'READY', 'PORT', 'CPUS', 'MEMORY', 'STATE FILE', 'BOOT', 'CLONES', 'CREATED'],
    templates.map((t) => [t.name, t.image, t.ready, t.port === null ? '-' : `${t.port}${t.httpPath ?? ''}`, String(t.vcpus), `${t.memoryMiB} MiB`,
      formatBytes(t.stateBytes), `${(t.timings.bootMs / 1000).toFixed(1)} s`, String(t.clones), t.createdAt]))
}

const enc = encodeURIComponent

/** `--after-clone signal[:SIGNAL] | http:[PORT]/PATH | none`, as the API's afterClone. */
export function parseAfterCloneFlag (value: string): Record<string, unknown> | null {
  if (value === 'none') return null
  const signal = /^signal(?::(SIG[A-Z0-9]+))?$/.exec(value)
  if (signal !== null) return { kind: 'signal', ...(signal[1] !== undefined ? { signal: signal[1] } : {}) }
  const http = /^http:(\d+)?(\/.*)$/.exec(value)
  if (http !== null && http[2] !== undefined) return { kind: 'http', path: http[2], ...(http[1] !== undefined ? { port: parseIntFlag(http[1], '--after-clone port', 1, 65535) } : {}) }
  throw new UigniterError('UIG_ERR_CLI_USAGE', `--after-clone takes signal[:SIGNAL], http:[PORT]/PATH or none, not "${value}"`)
}

export const templateCommands: Command[] = [
  {
    name: 'template create',
    summary: 'Boot an image to its ready point and snapshot it; VMs then start as clones of it (run --template).',
    usage: 'uigniter template create NAME IMAGE [--ready init|app] [--port N] [--http-path PATH] [--after-clone HOOK] [--cpus N] [--memory M] [-e K=V]... [--timeout S] [--json]',
    options: {
      ready: { type: 'string' },
      'after-clone': { type: 'string' },
      port: { type: 'string' },
      'http-path': { type: 'string' },
      cpus: { type: 'string' },
      memory: { type: 'string' },
      env: { type: 'string', short: 'e', multiple: true },
      timeout: { type: 'string' },
      json: { type: 'boolean' }
    },
    help: [
      '--ready init|app      init (default): snapshot where the init waits to start the app, so each clone gets its own env;',
      '                      app: snapshot once the app answers, so clones skip its start-up too (they share its env)',
      '--port N              ready app: the guest port that must answer (default: the image\'s first port)',
      '--http-path PATH      ready app: GET PATH must answer 2xx/3xx, instead of a TCP connection being accepted',
      '--after-clone HOOK    ready app: what each clone\'s app is told once it took its identity, replacing the image\'s hook:',
      '                      signal[:SIGUSR2] (the app acks on $UIGNITER_ACK_FD), http:[PORT]/PATH (POST, must answer 2xx), or none',
      '--cpus N, --memory M  resources (memory in MiB, or 512M); every clone has them',
      '-e K=V                the app\'s env, for every clone',
      '--timeout S           boot to the ready point (default 120)'
    ],
    run: async (values, positionals) => {
      const [name, image] = positionals
      if (positionals.length !== 2) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter template create NAME IMAGE [options]')
      const body: Record<string, unknown> = { name, image }
      if (values.ready !== undefined) body.ready = values.ready
      if (values.port !== undefined) body.port = parseIntFlag(values.port as string, '--port', 1, 65535)
      if (values['http-path'] !== undefined) body.httpPath = values['http-path']
      if (values['after-clone'] !== undefined) body.afterClone = parseAfterCloneFlag(values['after-clone'] as string)
      if (values.cpus !== undefined) body.vcpus = parseIntFlag(values.cpus as string, '--cpus', 1, 64)
      if (values.memory !== undefined) body.memoryMiB = parseMiB(values.memory as string, '--memory')
      if (values.env !== undefined) body.env = parseEnv(values.env as string[])
      if (values.timeout !== undefined) body.timeoutMs = parseIntFlag(values.timeout as string, '--timeout', 1, 600) * 1000
      const template = await (await daemonClient()).call<TemplateInfo>('POST', '/v1/templates', body)
      if (values.json === true) console.log(JSON.stringify(template, null, 2))
      else printTemplates([template])
      for (const warning of template.warnings ?? []) console.error(`warning: template ${template.name}: ${warning}`)
      return 0
    }
  },
  {
    name: 'template ls',
    summary: 'List templates with their live clones.',
    usage: 'uigniter template ls [--json]',
    options: { json: { type: 'boolean' } },
    help: [],
    run: async (values) => {
      const templates = await (await daemonClient()).call<TemplateInfo[]>('GET', '/v1/templates')
      if (values.json === true) console.log(JSON.stringify(templates, null, 2))
      else printTemplates(templates)
      return 0
    }
  },
  {
    name: 'template inspect',
    summary: 'Show a template as JSON.',
    usage: 'uigniter template inspect NAME',
    options: {},
    help: [],
    run: async (_values, positionals) => {
      const name = one(positionals, 'uigniter template inspect NAME')
      console.log(JSON.stringify(await (await daemonClient()).call<TemplateInfo>('GET', `/v1/templates/${enc(name)}`), null, 2))
      return 0
    }
  },
  {
    name: 'template rm',
    summary: 'Delete a template and its RAM file (refused while clones of it live).',
    usage: 'uigniter template rm NAME',
    options: {},
    help: [],
    run: async (_values, positionals) => {
      const name = one(positionals, 'uigniter template rm NAME')
      await (await daemonClient()).call('DELETE', `/v1/templates/${enc(name)}`)
      console.log(`removed template ${name}`)
      return 0
    }
  }
]
