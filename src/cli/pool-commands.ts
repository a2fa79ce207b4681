import { UigniterError } from '../core/errors.js'
import type { ClaimResult, PoolStatus } from '../core/pool.js'
import { daemonClient } from './api-client.js'
import { parseEnv, parseIntFlag, printTable, type Command } from './args.js'

function need (positionals: string[], n: number, usage: string): string[] {
  if (positionals.length !== n) throw new UigniterError('UIG_ERR_CLI_USAGE', `usage: ${usage}`)
  return positionals
}

const enc = encodeURIComponent

function printPools (pools: PoolStatus[]): void {
  printTable(['NAME', 'SOURCE', 'KIND', 'READY', 'CREATING', 'CLAIMED', 'MIN', 'MAX', 'ON EMPTY', 'ON RELEASE', 'HITS', 'MISSES'],
    pools.map((p) => [p.spec.name, p.spec.image ?? `template ${p.spec.template ?? '?'}`, p.spec.kind, String(p.ready), String(p.creating), String(p.claimed), String(p.spec.min), String(p.spec.max),
      p.spec.onEmpty, p.spec.onRelease, String(p.hits), String(p.misses)]))
}

export const poolCommands: Command[] = [
  {
    name: 'pool create',
    summary: 'Create a warm pool of an image\'s VMs (prespawned or booted) or of a template\'s clones, and start filling it.',
    usage: 'uigniter pool create NAME (IMAGE [--kind prespawned|booted] | --template TEMPLATE) [--min N] [--max N] [--on-empty create|queue|reject] [--queue-timeout S] [--on-release destroy|recycle] [--refill N] [--cpus N] [--memory MIB]',
    options: {
      kind: { type: 'string' },
      template: { type: 'string' },
      min: { type: 'string' },
      max: { type: 'string' },
      'on-empty': { type: 'string' },
      'queue-timeout': { type: 'string' },
      'on-release': { type: 'string' },
      refill: { type: 'string' },
      cpus: { type: 'string' },
      memory: { type: 'string' },
      json: { type: 'boolean' }
    },
    help: [
      '--kind KIND            prespawned (default): QEMU started and paused; booted: booted, the app starts at the claim',
      '--template T           a pool of clones of template T (kind clone)',
      '--min N, --max N       ready instances kept; instances in all (default 1, 10)',
      '--on-empty POLICY      create (default): one more beyond the pool; queue: wait; reject: fail',
      '--queue-timeout S      how long a queued claim waits (default 30)',
      '--on-release POLICY    recycle (default): destroy and replace with a fresh one; destroy',
      '--refill N             instances made at once in the background (default 1)'
    ],
    run: async (values, positionals) => {
      const template = values.template as string | undefined
      const usage = 'uigniter pool create NAME (IMAGE | --template TEMPLATE) [options]'
      const [name, image] = need(positionals, template === undefined ? 2 : 1, usage)
      const body: Record<string, unknown> = template === undefined
        ? { name, image, ...(values.kind !== undefined ? { kind: values.kind } : {}) }
        : { name, template, kind: values.kind ?? 'clone' }
      const int = (flag: string, key: string, min: number, max: number, scale = 1): void => {
        if (values[flag] !== undefined) body[key] = parseIntFlag(values[flag] as string, `--${flag}`, min, max) * scale
      }
      int('min', 'min', 0, 1000)
      int('max', 'max', 1, 1000)
      int('queue-timeout', 'queueTimeoutMs', 0, 600, 1000)
      int('refill', 'refillConcurrency', 1, 64)
      int('cpus', 'vcpus', 1, 64)
      int('memory', 'memoryMiB', 32, 1048576)
      if (values['on-empty'] !== undefined) body.onEmpty = values['on-empty']
      if (values['on-release'] !== undefined) body.onRelease = values['on-release']
      const pool = await (await daemonClient()).call<PoolStatus>('POST', '/v1/pools', body)
      if (values.json === true) console.log(JSON.stringify(pool, null, 2))
      else printPools([pool])
      return 0
    }
  },
  {
    name: 'pool ls',
    summary: 'List pools with their depth and counters.',
    usage: 'uigniter pool ls [--json]',
    options: { json: { type: 'boolean' } },
    help: [],
    run: async (values) => {
      const pools = await (await daemonClient()).call<PoolStatus[]>('GET', '/v1/pools')
      if (values.json === true) console.log(JSON.stringify(pools, null, 2))
      else printPools(pools)
      return 0
    }
  },
  {
    name: 'pool resize',
    summary: 'Change a pool\'s minimum and maximum.',
    usage: 'uigniter pool resize NAME [--min N] [--max N]',
    options: { min: { type: 'string' }, max: { type: 'string' } },
    help: [],
    run: async (values, positionals) => {
      const [name] = need(positionals, 1, 'uigniter pool resize NAME [--min N] [--max N]')
      const body: Record<string, number> = {}
      if (values.min !== undefined) body.min = parseIntFlag(values.min as string, '--min', 0, 1000)
      if (values.max !== undefined) body.max = parseIntFlag(values.max as string, '--max', 1, 1000)
      printPools([await (await daemonClient()).call<PoolStatus>('PATCH', `/v1/pools/${enc(name ?? '')}`, body)])
      return 0
    }
  },
  {
    name: 'pool rm',
    summary: 'Delete a pool and its ready VMs (claimed VMs stay).',
    usage: 'uigniter pool rm NAME',
    options: {},
    help: [],
    run: async (_values, positionals) => {
      const [name] = need(positionals, 1, 'uigniter pool rm NAME')
      await (await daemonClient()).call('DELETE', `/v1/pools/${enc(name ?? '')}`)
      console.log(`removed pool ${name ?? ''}`)
      return 0
    }
  },
  {
    name: 'pool claim',
    summary: 'Claim a VM from a pool: prints its id, address, start path and timings.',
    usage: 'uigniter pool claim NAME [--on-empty create|queue|reject] [-e K=V]... [--json]',
    options: { 'on-empty': { type: 'string' }, env: { type: 'string', short: 'e', multiple: true }, json: { type: 'boolean' } },
    help: ['-e K=V                 the app\'s env (booted pools: the app starts at the claim)'],
    run: async (values, positionals) => {
      const [name] = need(positionals, 1, 'uigniter pool claim NAME')
      const env = values.env !== undefined ? parseEnv(values.env as string[]) : undefined
      const claim = await (await daemonClient()).call<ClaimResult>('POST', `/v1/pools/${enc(name ?? '')}/claim`,
        { ...(values['on-empty'] !== undefined ? { onEmpty: values['on-empty'] } : {}), ...(env !== undefined ? { env } : {}) })
      if (values.json === true) console.log(JSON.stringify(claim, null, 2))
      else console.log(`${claim.vm.id}  ${claim.vm.name}  ${claim.vm.ipAddress ?? '-'}  ${claim.path}  ${claim.timings.totalMs.toFixed(1)} ms (wait ${claim.timings.waitMs.toFixed(1)}, resume ${claim.timings.resumeMs.toFixed(1)})`)
      return 0
    }
  },
  {
    name: 'pool release',
    summary: 'Give a claimed VM back to its pool.',
    usage: 'uigniter pool release NAME VM [--on-release destroy|recycle]',
    options: { 'on-release': { type: 'string' } },
    help: [],
    run: async (values, positionals) => {
      const [name, vm] = need(positionals, 2, 'uigniter pool release NAME VM')
      await (await daemonClient()).call('POST', `/v1/pools/${enc(name ?? '')}/release`, { vm, ...(values['on-release'] !== undefined ? { onRelease: values['on-release'] } : {}) })
      console.log(`released ${vm ?? ''}`)
      return 0
    }
  }
]
