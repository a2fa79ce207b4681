import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { run } from '../../src/core/exec.js'

export interface MeterReading { bytes: number, packets: number }

/**
 * Counts, with nft counters inside one network namespace, the bytes on the
 * wire (IP packets) between the etcd clients of that namespace and any etcd
 * member's client port, both ways: requests leaving (dport), answers from a
 * member in the same namespace (sport, on lo, counted once on their way out)
 * and answers from a member elsewhere (sport, arriving on another link).
 * Other clients of a member that runs here are not counted: their requests
 * arrive and their answers leave by the underlay link. Peer traffic (2380)
 * is not counted either.
 */
export class NetnsEtcdMeter {
  readonly #ns: string
  readonly #table: string
  readonly #port: number

  constructor (ns: string, options: { table?: string, port?: number } = {}) {
    this.#ns = ns
    this.#table = options.table ?? 'uigbench_meter'
    this.#port = options.port ?? 2379
  }

  async start (): Promise<void> {
    const p = this.#port
    const script = [
      `table inet ${this.#table} {`,
      '  counter requests { }',
      '  counter local_answers { }',
      '  counter remote_answers { }',
      '  chain out { type filter hook output priority 0; policy accept;',
      `    tcp dport ${p} counter name requests`,
      `    oifname "lo" tcp sport ${p} counter name local_answers`,
      '  }',
      '  chain in { type filter hook input priority 0; policy accept;',
      `    iifname != "lo" tcp sport ${p} counter name remote_answers`,
      '  }',
      '}'
    ].join('\n')
    await this.close()
    const dir = await mkdtemp(join(tmpdir(), 'uigbench-nft-'))
    try {
      await writeFile(join(dir, 'meter.nft'), script + '\n')
      await run('ip', ['netns', 'exec', this.#ns, 'nft', '-f', join(dir, 'meter.nft')])
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  }

  /** The three counters summed, and each apart. */
  async read (): Promise<MeterReading & { parts: Record<string, MeterReading> }> {
    const { stdout } = await run('ip', ['netns', 'exec', this.#ns, 'nft', '-j', 'list', 'counters', 'table', 'inet', this.#table])
    const parsed = JSON.parse(stdout) as { nftables: Array<{ counter?: { name: string, bytes: number, packets: number } }> }
    const parts: Record<string, MeterReading> = {}
    let bytes = 0
    let packets = 0
    for (const item of parsed.nftables) {
      if (item.counter === undefined) continue
      parts[item.counter.name] = { bytes: item.counter.bytes, packets: item.counter.packets }
      bytes += item.counter.bytes
      packets += item.counter.packets
    }
    return { bytes, packets, parts }
  }

  async close (): Promise<void> {
    await run('ip', ['netns', 'exec', this.#ns, 'nft', 'delete', 'table', 'inet', this.#table]).catch(() => {})
  }
}
