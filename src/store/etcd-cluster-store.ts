import { Etcd3, type IKeyValue, type IWatchResponse, type Lease, type Watcher } from 'etcd3'
import { UigniterError } from '../core/errors.js'
import type { Logger } from '../core/logger.js'
import type { ClusterLeaseEvents, ClusterStore, ClusterWatch, KeyValue, KvChange, TxnCompare, TxnOp } from '../core/ports/cluster-store.js'

export interface EtcdClusterStoreOptions {
  endpoints: string[]
  leaseTtlS: number
  log: Logger
  /** How long one call may take before it fails as unavailable; default 5 s (an etcd election under load takes seconds). */
  callTimeoutMs?: number
}

/** The end of a prefix range: the prefix with its last byte raised by one. */
function prefixEnd (prefix: string): Buffer {
  const end = Buffer.from(prefix)
  end[end.length - 1] = (end[end.length - 1] ?? 0) + 1
  return end
}

function toKeyValue (kv: IKeyValue): KeyValue {
  return { key: kv.key.toString(), value: kv.value.toString(), createRevision: Number(kv.create_revision), modRevision: Number(kv.mod_revision) }
}

/**
 * The cluster store on etcd (v3 API, npm etcd3). What the client library
 * leaves to its user is done here:
 * - every call has a deadline, and fails with UIG_ERR_CLUSTER_UNAVAILABLE
 *   when etcd has no quorum or cannot be reached, instead of retrying forever;
 * - the node's lease is kept alive by our own loop, which counts an
 *   unreachable etcd past the TTL as an expiry (etcd has expired the lease by
 *   then, or will once it is back) and grants a new lease when it can;
 * - watches resume from the last revision they delivered, and start again
 *   from a fresh listing when that history was compacted.
 */
export class EtcdClusterStore implements ClusterStore {
  readonly leaseTtlS: number
  readonly #client: Etcd3
  readonly #log: Logger
  readonly #timeoutMs: number
  #lease: Lease | undefined
  #leaseId: string | undefined
  #leaseAlive = false
  #leaseTimer: NodeJS.Timeout | undefined
  #lastRenewal = 0
  #closed = false
  #writes = 0

  constructor (options: EtcdClusterStoreOptions) {
    this.leaseTtlS = options.leaseTtlS
    this.#log = options.log
    this.#timeoutMs = options.callTimeoutMs ?? 5000
    this.#client = new Etcd3({ hosts: options.endpoints, dialTimeout: this.#timeoutMs })
  }

  get leaseAlive (): boolean { return this.#leaseAlive }
  get writes (): number { return this.#writes }

  async startLease (events: ClusterLeaseEvents): Promise<void> {
    await this.#grant()
    // A third of the TTL between renewals: two may fail before the lease runs out.
    const every = Math.max(250, (this.leaseTtlS * 1000) / 3)
    const renew = async (): Promise<void> => {
      if (this.#closed) return
      if (!this.#leaseAlive) {
        try {
          await this.#grant()
          this.#log.warn('granted the node a new lease after the last one expired')
          events.renewed()
        } catch { /* still unreachable: try at the next round */ }
        return
      }
      let expired = false
      try {
        // Bounded by the renewal period, not the usual call deadline: a renewal that hangs must not
        // push the next one past the TTL while etcd is answering the others.
        const answer = await this.#call('renew the node lease', async () => await (this.#lease as Lease).keepaliveOnce(), every)
        if (Number(answer.TTL) <= 0) expired = true
        else this.#lastRenewal = Date.now()
      } catch (err) {
        if (/lease not found|requested lease not found/i.test((err as Error).message)) expired = true
        else if (Date.now() - this.#lastRenewal > this.leaseTtlS * 1000) expired = true
      }
      if (expired) {
        this.#leaseAlive = false
        this.#log.warn('the node lease expired: the cluster counts this node lost until it renews')
        events.expired()
      }
    }
    const loop = (): void => {
      this.#leaseTimer = setTimeout(() => { void renew().finally(() => { if (!this.#closed) loop() }) }, every)
    }
    loop()
  }

  async #grant (): Promise<void> {
    const lease = this.#client.lease(this.leaseTtlS, { autoKeepAlive: false })
    // The library reports a lost lease as an event too; our loop finds out on its own, so the event is only logged.
    lease.on('lost', (err) => { this.#log.debug({ err }, 'etcd lease reported lost') })
    this.#leaseId = await this.#call('grant the node lease', async () => await lease.grant())
    this.#lease = lease
    this.#leaseAlive = true
    this.#lastRenewal = Date.now()
  }

  async get (key: string): Promise<KeyValue | undefined> {
    const res = await this.#call(`read ${key}`, async (deadline) => await this.#client.kv.range({ key: Buffer.from(key) }, { deadline }), this.#timeoutMs, true)
    const kv = res.kvs[0]
    return kv === undefined ? undefined : toKeyValue(kv)
  }

  async list (prefix: string): Promise<{ items: KeyValue[], revision: number }> {
    const res = await this.#call(`list ${prefix}`, async (deadline) => await this.#client.kv.range({ key: Buffer.from(prefix), range_end: prefixEnd(prefix) }, { deadline }), this.#timeoutMs, true)
    return { items: res.kvs.map(toKeyValue), revision: Number(res.header.revision) }
  }

  async txn (ops: TxnOp[], compares: TxnCompare[] = []): Promise<{ succeeded: boolean, revision: number }> {
    if (ops.some((op) => 'put' in op && op.leased === true) && this.#leaseId === undefined) {
      throw new UigniterError('UIG_ERR_CLUSTER_UNAVAILABLE', 'this node has no lease in the cluster store yet')
    }
    const request = {
      compare: compares.map((c) => 'createRevision' in c
        ? { key: Buffer.from(c.key), target: 'Create' as const, result: 'Equal' as const, create_revision: c.createRevision }
        : { key: Buffer.from(c.key), target: 'Mod' as const, result: 'Equal' as const, mod_revision: c.modRevision }),
      success: ops.map((op) => 'put' in op
        ? { request_put: { key: Buffer.from(op.put), value: Buffer.from(op.value), ...(op.leased === true ? { lease: this.#leaseId } : {}) } }
        : { request_delete_range: { key: Buffer.from(op.delete) } }),
      failure: []
    }
    // Only a transaction without compares is tried again: one with compares may have been applied with its answer lost.
    const res = await this.#call('write to the cluster store', async (deadline) => await this.#client.kv.txn(request, { deadline }), this.#timeoutMs, compares.length === 0)
    if (res.succeeded) this.#writes++
    return { succeeded: res.succeeded, revision: Number(res.header.revision) }
  }

  watch (prefix: string, afterRevision: number, onChanges: (changes: KvChange[], revision: number) => void, onReset: () => void): ClusterWatch {
    let watcher: Watcher | undefined
    let closed = false
    let last = afterRevision
    const open = (): void => {
      this.#client.watch().prefix(prefix).startRevision(String(last + 1)).create().then((w) => {
        if (closed) { void w.cancel().catch(() => {}); return }
        watcher = w
        w.on('data', (res: IWatchResponse) => {
          const changes: KvChange[] = res.events.map((e) => e.type === 'Delete'
            ? { type: 'delete' as const, key: e.kv.key.toString(), modRevision: Number(e.kv.mod_revision) }
            : { type: 'put' as const, kv: toKeyValue(e.kv) })
          const revision = Number(res.header.revision)
          if (changes.length === 0) return
          last = Math.max(last, ...changes.map((c) => c.type === 'put' ? c.kv.modRevision : c.modRevision))
          onChanges(changes, revision)
        })
        w.on('error', (err: Error) => {
          if (closed) return
          // A compacted revision cannot be resumed from: the caller lists again and watches from there.
          this.#log.warn({ err, prefix }, 'a cluster watch failed; starting it again from a fresh listing')
          void w.cancel().catch(() => {})
          onReset()
        })
      }, (err: unknown) => {
        if (closed) return
        this.#log.debug({ err, prefix }, 'a cluster watch could not start; retrying')
        setTimeout(open, 1000)
      })
    }
    open()
    return { close: () => { closed = true; void watcher?.cancel().catch(() => {}) } }
  }

  async close (): Promise<void> {
    this.#closed = true
    clearTimeout(this.#leaseTimer)
    // Revoked, not left to expire: the others see this node go at once, not a TTL later.
    if (this.#leaseAlive) await this.#lease?.revoke({ deadline: new Date(Date.now() + 1000) }).catch(() => {})
    this.#client.close()
  }

  /**
   * Runs one call against its deadline; any failure of the store is
   * UIG_ERR_CLUSTER_UNAVAILABLE. A call that may be repeated is tried in two
   * halves of the time: the first may have gone to a member that just died,
   * and the client moves to another.
   */
  async #call<T> (what: string, work: (deadline: Date) => Promise<T>, timeoutMs = this.#timeoutMs, repeatable = false): Promise<T> {
    const attempt = async (ms: number): Promise<T> => {
      let timer: NodeJS.Timeout | undefined
      try {
        return await Promise.race([
          work(new Date(Date.now() + ms)),
          new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms) })
        ])
      } finally {
        clearTimeout(timer)
      }
    }
    try {
      if (!repeatable) return await attempt(timeoutMs)
      try {
        return await attempt(timeoutMs / 2)
      } catch {
        return await attempt(timeoutMs / 2)
      }
    } catch (err) {
      throw new UigniterError('UIG_ERR_CLUSTER_UNAVAILABLE', `cannot ${what}: the cluster store (etcd) did not answer (${(err as Error).message}); nothing was changed`, { cause: err })
    }
  }
}
