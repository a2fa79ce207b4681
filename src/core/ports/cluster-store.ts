/**
 * The cluster store port: the state the nodes of a cluster must agree on
 * (node records, placements, replica reports, routes), as keys and values
 * with revisions, transactions, watches and one lease per node. etcd is
 * the adapter (src/store/etcd-cluster-store.ts). It is asynchronous and may
 * be unreachable: every call then fails with UIG_ERR_CLUSTER_UNAVAILABLE,
 * and a watch resumes where it stopped once the store is back.
 *
 * The node-local StateStore (SQLite) stays as it is: a node's VMs, pools
 * and addresses never leave it.
 */

export interface KeyValue { key: string, value: string, createRevision: number, modRevision: number }

export type KvChange =
  | { type: 'put', kv: KeyValue }
  | { type: 'delete', key: string, modRevision: number }

export type TxnOp =
  | { put: string, value: string, leased?: boolean }
  | { delete: string }

/** A guard of a transaction: the key's create revision (0: absent) or mod revision must be this. */
export type TxnCompare =
  | { key: string, createRevision: number }
  | { key: string, modRevision: number }

export interface ClusterWatch {
  /** Stops watching. */
  close: () => void
}

export interface ClusterLeaseEvents {
  /** The lease ran out (the store said so, or it stayed unreachable past the TTL): leased keys are gone. */
  expired: () => void
  /** A new lease was granted after one expired: the node must publish its leased keys again. */
  renewed: () => void
}

export interface ClusterStore {
  /** The lease's TTL, in seconds: how long a node that stops renewing it stays listed. */
  readonly leaseTtlS: number
  /** Grants the node's lease and keeps it alive until close(), granting a new one when it expires. */
  startLease: (events: ClusterLeaseEvents) => Promise<void>
  /** True while the lease is known alive. */
  readonly leaseAlive: boolean
  get: (key: string) => Promise<KeyValue | undefined>
  /** Every key under the prefix, and the store's revision the listing is of. */
  list: (prefix: string) => Promise<{ items: KeyValue[], revision: number }>
  /** Applies every op, or none when a compare fails. Leased puts go under the node's lease. */
  txn: (ops: TxnOp[], compares?: TxnCompare[]) => Promise<{ succeeded: boolean, revision: number }>
  /**
   * Calls `onChanges` for every change under the prefix after `afterRevision`,
   * in order; `onReset` when the watch had to start again from a fresh
   * listing (the history it needed was compacted away).
   */
  watch: (prefix: string, afterRevision: number, onChanges: (changes: KvChange[], revision: number) => void, onReset: () => void) => ClusterWatch
  /** Counts the store's writes (transactions and puts) this client made: the control plane's cost. */
  readonly writes: number
  close: () => Promise<void>
}
