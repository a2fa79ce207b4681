import { Etcd3, type IWatchResponse, type Watcher } from 'etcd3'

/** One key changed in one etcd revision, as the recorder's watch saw it. */
export interface RecordedChange {
  revision: number
  type: 'put' | 'delete'
  key: string
  valueBytes: number
  value: string
  /** performance.now() when the watch delivered it. */
  at: number
}

/**
 * Watches a prefix of a real etcd and keeps every change with the revision
 * it was written in, so that a benchmark can say how many writes (revisions)
 * an action cost and what each one was. Also reads the current revision,
 * and waits for the store to be quiet (no new revision for a while).
 */
export class EtcdRecorder {
  readonly #client: Etcd3
  readonly #prefix: string
  readonly changes: RecordedChange[] = []
  #watcher: Watcher | undefined

  constructor (endpoints: string[], prefix: string) {
    this.#client = new Etcd3({ hosts: endpoints, dialTimeout: 3000 })
    this.#prefix = prefix
  }

  async start (): Promise<void> {
    const from = await this.revision()
    this.#watcher = await this.#client.watch().prefix(this.#prefix).startRevision(String(from + 1)).create()
    this.#watcher.on('data', (res: IWatchResponse) => {
      const at = performance.now()
      for (const e of res.events) {
        const value = e.kv.value?.toString() ?? ''
        this.changes.push({ revision: Number(e.kv.mod_revision), type: e.type === 'Delete' ? 'delete' : 'put', key: e.kv.key.toString(), valueBytes: value.length, value, at })
      }
    })
  }

  /** The store's current revision: every successful write (a put, a delete, a txn with either) raises it by one. */
  async revision (): Promise<number> {
    const res = await this.#client.kv.range({ key: Buffer.from(this.#prefix), limit: '1' }, { deadline: new Date(Date.now() + 3000) })
    return Number(res.header.revision)
  }

  async value (key: string): Promise<string | undefined> {
    return (await this.#client.get(key).string()) ?? undefined
  }

  /** Resolves once no revision was made for `quietMs`; rejects after `timeoutMs`. */
  async quiet (quietMs: number, timeoutMs: number): Promise<number> {
    const deadline = performance.now() + timeoutMs
    let last = await this.revision()
    let since = performance.now()
    while (true) {
      await new Promise((resolve) => setTimeout(resolve, 200))
      const now = await this.revision()
      if (now !== last) { last = now; since = performance.now() } else if (performance.now() - since >= quietMs) return now
      if (performance.now() > deadline) throw new Error(`etcd was not quiet for ${quietMs} ms within ${timeoutMs} ms (revision ${now})`)
    }
  }

  /** The changes in revisions (after, upTo]. */
  between (after: number, upTo: number): RecordedChange[] {
    return this.changes.filter((c) => c.revision > after && c.revision <= upTo)
  }

  async close (): Promise<void> {
    await this.#watcher?.cancel().catch(() => {})
    this.#client.close()
  }
}

/**
 * One line per revision: `812: put placements/n2/x (788 B) + put nodes/n2 (621 B)`;
 * a put of the very value the key already had is marked `same value again`.
 */
export function describeRevisions (changes: RecordedChange[], prefix: string): string[] {
  const byRevision = new Map<number, RecordedChange[]>()
  for (const c of changes) byRevision.set(c.revision, [...(byRevision.get(c.revision) ?? []), c])
  const last = new Map<string, string>()
  return [...byRevision.entries()].sort(([a], [b]) => a - b).map(([rev, cs]) => `${rev}: ${cs.map((c) => {
    const before = last.get(c.key)
    const note = c.type !== 'put' || before === undefined ? '' : before === c.value ? ', same value again' : `, changed: ${changedPaths(before, c.value).join(', ')}`
    if (c.type === 'put') last.set(c.key, c.value)
    else last.delete(c.key)
    return `${c.type} ${c.key.slice(prefix.length)}${c.type === 'put' ? ` (${c.valueBytes} B${note})` : ''}`
  }).join(' + ')}`)
}

/** Keys of the puts in `changes` that wrote the value the key already had (within `changes`). */
export function repeatedPuts (changes: RecordedChange[]): number {
  const last = new Map<string, string>()
  let n = 0
  for (const c of [...changes].sort((a, b) => a.revision - b.revision)) {
    if (c.type === 'put') { if (last.get(c.key) === c.value) n++; last.set(c.key, c.value) } else last.delete(c.key)
  }
  return n
}

/** Where two JSON texts differ, as paths (`vm.startTimings.totalMs`), at most `limit`; `(not JSON)` when either is not. */
export function changedPaths (a: string, b: string, limit = 4): string[] {
  let x: unknown
  let y: unknown
  try { x = JSON.parse(a); y = JSON.parse(b) } catch { return ['(not JSON)'] }
  const out: string[] = []
  const walk = (u: unknown, v: unknown, path: string): void => {
    if (out.length >= limit) return
    if (typeof u === 'object' && u !== null && typeof v === 'object' && v !== null && Array.isArray(u) === Array.isArray(v)) {
      const ku = Object.keys(u)
      const kv = Object.keys(v)
      if (ku.join() === kv.join() || new Set([...ku, ...kv]).size !== ku.length) {
        for (const k of new Set([...ku, ...kv])) walk((u as Record<string, unknown>)[k], (v as Record<string, unknown>)[k], path === '' ? k : `${path}.${k}`)
        return
      }
      // The same keys in another order: JSON.stringify sees a change, the record does not.
      for (const k of ku) walk((u as Record<string, unknown>)[k], (v as Record<string, unknown>)[k], path === '' ? k : `${path}.${k}`)
      if (out.length === 0) out.push(`${path === '' ? '(top)' : path}: key order only`)
      return
    }
    if (JSON.stringify(u) !== JSON.stringify(v)) out.push(path === '' ? '(top)' : path)
  }
  walk(x, y, '')
  return out.length === 0 ? ['(key order only)'] : out
}
