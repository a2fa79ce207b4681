import { NODE_NAME, type NodeView } from '../core/cluster.js'
import { UigniterError } from '../core/errors.js'
import { daemonClient, type ApiClient } from './api-client.js'
import { parseIntFlag, printTable, type Command } from './args.js'

const enc = encodeURIComponent

/** What GET /v1/nodes/NAME adds to a node's view: the replicas placed on it. */
interface NodeDetail extends NodeView {
  placements: Array<{ replica: string, service: string, state: string }>
}

/** What POST /v1/nodes/NAME/drain answers once nothing is left on the node, or at its timeout. */
interface DrainResult { node: string, moved: number, remaining: string[], cordoned: boolean }

/** Checked here so that a typo is a usage error, not a round trip ending in "no such node". */
export function parseNodeName (text: string, what = 'a node name'): string {
  if (!NODE_NAME.test(text)) throw new UigniterError('UIG_ERR_CLI_USAGE', `${what} is 1 to 32 lowercase letters, digits or dashes (no dash at either end), not "${text}"`)
  return text
}

/**
 * The cluster's nodes, or undefined when the daemon runs a single host.
 * /v1/info says nothing about a cluster; /v1/nodes does, by refusing.
 */
export async function clusterNodes (api: ApiClient): Promise<NodeView[] | undefined> {
  try {
    return await api.call<NodeView[]>('GET', '/v1/nodes')
  } catch (err) {
    if (err instanceof UigniterError && err.code === 'UIG_ERR_CLUSTER_NOT_ENABLED') return undefined
    throw err
  }
}

function labelsText (labels: Record<string, string>): string {
  const pairs = Object.entries(labels).map(([k, v]) => `${k}=${v}`)
  return pairs.length > 0 ? pairs.join(',') : '-'
}

function names (positionals: string[], usage: string): string[] {
  if (positionals.length === 0) throw new UigniterError('UIG_ERR_CLI_USAGE', `usage: ${usage}`)
  return positionals.map((p) => parseNodeName(p))
}

function cordonCommand (verb: 'cordon' | 'uncordon', summary: string): Command {
  return {
    name: `node ${verb}`,
    summary,
    usage: `uigniter node ${verb} NODE...`,
    options: {},
    help: [],
    run: async (_values, positionals) => {
      const api = await daemonClient()
      for (const name of names(positionals, `uigniter node ${verb} NODE...`)) {
        const view = await api.call<NodeView>('POST', `/v1/nodes/${enc(name)}/${verb}`)
        console.log(`${view.name}  ${view.state}`)
      }
      return 0
    }
  }
}

export const nodeCommands: Command[] = [
  {
    name: 'node ls',
    summary: 'List the cluster\'s nodes: state, labels, vCPUs and memory allocated of capacity, VMs, and which one leads.',
    usage: 'uigniter node ls [--json]',
    options: { json: { type: 'boolean' } },
    help: [
      '--json   print JSON',
      'STATE is ready, cordoned (takes no new replicas) or lost (its lease expired)',
      'VCPUS and MEMORY MiB are allocated/capacity; LEADER marks the node that schedules'
    ],
    run: async (values, positionals) => {
      if (positionals.length > 0) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter node ls [--json]')
      const nodes = await (await daemonClient()).call<NodeView[]>('GET', '/v1/nodes')
      if (values.json === true) console.log(JSON.stringify(nodes, null, 2))
      else {
        printTable(['NAME', 'ADDRESS', 'STATE', 'LABELS', 'VCPUS', 'MEMORY MiB', 'VMS', 'LEADER'],
          nodes.map((n) => [n.name, n.underlay, n.state, labelsText(n.labels), `${n.allocated.vcpus}/${n.capacity.vcpus}`,
            `${n.allocated.memoryMiB}/${n.capacity.memoryMiB}`, String(n.vms), n.leader ? '*' : '']))
      }
      return 0
    }
  },
  {
    name: 'node inspect',
    summary: 'Print nodes as JSON: status, capacity, images, templates, and the replicas placed on each.',
    usage: 'uigniter node inspect NODE...',
    options: {},
    help: [],
    run: async (_values, positionals) => {
      const api = await daemonClient()
      const nodes = []
      for (const name of names(positionals, 'uigniter node inspect NODE...')) nodes.push(await api.call<NodeDetail>('GET', `/v1/nodes/${enc(name)}`))
      console.log(JSON.stringify(nodes.length === 1 ? nodes[0] : nodes, null, 2))
      return 0
    }
  },
  cordonCommand('cordon', 'Place no new replica on the nodes; what they run stays.'),
  cordonCommand('uncordon', 'Let the nodes take new replicas again.'),
  {
    name: 'node drain',
    summary: 'Cordon a node and move its services\' replicas to other nodes (a new one first, then the old one stopped); exit 1 if some are left at the timeout.',
    usage: 'uigniter node drain NODE [--timeout SECONDS] [--json]',
    options: { timeout: { type: 'string' }, json: { type: 'boolean' } },
    help: [
      '--timeout SECONDS   how long the daemon waits for the replicas to move (default 300)',
      '--json              print the result as JSON',
      'VMs that belong to no service are not moved: they stay on the node until removed'
    ],
    run: async (values, positionals) => {
      if (positionals.length !== 1) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter node drain NODE [--timeout SECONDS]')
      const name = parseNodeName(positionals[0] ?? '')
      const timeoutS = values.timeout === undefined ? 300 : parseIntFlag(values.timeout as string, '--timeout', 1, 3600)
      const api = await daemonClient()
      // The call blocks until the daemon is done; ApiClient sets no deadline of its own, so the server's timeoutS is the one that ends it.
      const result = await api.call<DrainResult>('POST', `/v1/nodes/${enc(name)}/drain?timeoutS=${timeoutS}`)
      if (values.json === true) {
        console.log(JSON.stringify(result, null, 2))
        return result.remaining.length > 0 ? 1 : 0
      }
      const detail = await api.call<NodeDetail>('GET', `/v1/nodes/${enc(name)}`)
      const plain = Math.max(0, detail.vms - detail.placements.length)
      const moved = Math.max(0, result.moved - result.remaining.length)
      const plural = (n: number, word: string): string => `${n} ${word}${n === 1 ? '' : 's'}`
      console.log([
        `${result.node} cordoned; ${result.moved === 0 ? 'no replica to move' : `moved ${moved} of ${plural(result.moved, 'replica')}`}`,
        ...(result.remaining.length > 0 ? [`${result.remaining.length} left after ${timeoutS} s: ${result.remaining.join(', ')}`] : []),
        ...(plain > 0 ? [`${plural(plain, 'VM')} of no service stay${plain === 1 ? 's' : ''} on ${result.node}: a drain moves only replicas`] : [])
      ].join('\n'))
      return result.remaining.length > 0 ? 1 : 0
    }
  }
]
