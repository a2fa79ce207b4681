import type { Logger } from '../core/logger.js'
import type { ClusterStore } from '../core/ports/cluster-store.js'
import { keys } from './cluster-keys.js'
import { parseRecord, LeaderRecordSchema, type LeaderRecord } from './cluster-records.js'

export interface LeaderElectionEvents {
  /** This node leads from now on; `epoch` (the leader key's create revision) guards its writes. */
  elected: (epoch: number) => void
  /** This node no longer leads (its lease expired, or the key is another's). */
  deposed: () => void
  /** The leader changed (null: none known). */
  leader: (leader: LeaderRecord | null) => void
}

/**
 * One leader, elected through the store: the leader key is created under
 * the candidate's lease only if it is absent, so exactly one node holds it,
 * and it goes when that node's lease does (at most the TTL after the node
 * died). The key's create revision is the leader's epoch: the leader's
 * writes compare it, so a deposed leader that has not noticed yet cannot
 * write (fencing).
 */
export class LeaderElection {
  readonly #store: ClusterStore
  readonly #me: LeaderRecord
  readonly #events: LeaderElectionEvents
  readonly #log: Logger
  #epoch: number | null = null
  #leader: LeaderRecord | null = null
  #timer: NodeJS.Timeout | undefined
  #closed = false
  #busy = false

  constructor (options: { store: ClusterStore, me: LeaderRecord, events: LeaderElectionEvents, log: Logger }) {
    this.#store = options.store
    this.#me = options.me
    this.#events = options.events
    this.#log = options.log
  }

  /** The epoch while this node leads, else null. */
  get epoch (): number | null { return this.#epoch }
  get leader (): LeaderRecord | null { return this.#leader }

  start (): void {
    void this.#round()
    // Rounds on a timer, not a watch: a watch misses the moment the key went while etcd was out of
    // reach, and a quarter of the TTL is small beside the TTL a takeover waits for anyway.
    this.#timer = setInterval(() => { void this.#round() }, Math.max(500, (this.#store.leaseTtlS * 1000) / 4))
  }

  /** Called when the node's lease expired: whatever this node held is gone. */
  leaseExpired (): void {
    if (this.#epoch !== null) this.#stepDown('the node lease expired')
  }

  async close (): Promise<void> {
    this.#closed = true
    clearInterval(this.#timer)
    if (this.#epoch !== null) {
      const epoch = this.#epoch
      this.#stepDown('the daemon is stopping')
      // Hands over at once instead of after the TTL.
      await this.#store.txn([{ delete: keys.leader }], [{ key: keys.leader, createRevision: epoch }]).catch(() => {})
    }
  }

  async #round (): Promise<void> {
    if (this.#busy || this.#closed) return
    this.#busy = true
    try {
      const current = await this.#store.get(keys.leader)
      if (current === undefined) {
        if (!this.#store.leaseAlive) return
        const { succeeded, revision } = await this.#store.txn(
          [{ put: keys.leader, value: JSON.stringify(this.#me), leased: true }],
          [{ key: keys.leader, createRevision: 0 }])
        if (succeeded && !this.#closed) {
          this.#epoch = revision
          this.#setLeader(this.#me)
          this.#log.info({ epoch: revision }, 'this node leads the cluster')
          this.#events.elected(revision)
        }
        return
      }
      let record: LeaderRecord | null = null
      try { record = parseRecord(LeaderRecordSchema, current.value) } catch { record = null }
      if (this.#epoch !== null && current.createRevision !== this.#epoch) this.#stepDown('another node holds the leader key')
      this.#setLeader(record)
    } catch (err) {
      // The store is out of reach: a leader keeps leading until its lease is known expired.
      this.#log.debug({ err }, 'leader election round failed')
    } finally {
      this.#busy = false
    }
  }

  #stepDown (why: string): void {
    this.#epoch = null
    this.#log.warn(`this node no longer leads: ${why}`)
    this.#events.deposed()
  }

  #setLeader (record: LeaderRecord | null): void {
    if (JSON.stringify(record) === JSON.stringify(this.#leader)) return
    this.#leader = record
    this.#events.leader(record)
  }
}
