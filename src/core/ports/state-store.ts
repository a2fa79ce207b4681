import type { PoolSpec } from '../pool.js'
import type { ServiceSpec } from '../service.js'
import type { Vm, VmState } from '../vm.js'
import type { VolumeRecord } from '../volume.js'

/**
 * The state store port: the records that outlive the daemon. SQLite is the
 * embedded adapter (src/store/sqlite-store.ts); the cluster adds etcd.
 * Templates are not here: a template is its RAM file and device state on one
 * host, so its record (template.json) stays beside them.
 */

export interface StoredService { spec: ServiceSpec, app: string | null, generation: number }

export interface VmFilter { state?: VmState[], image?: string, name?: string }

/** Address allocations; `reserve` must be atomic across processes (two daemons may share a store). */
export interface IpAllocationStore {
  list: () => Array<{ ip: string, owner: string }>
  /** False when the address is taken already. */
  reserve: (ip: string, owner: string) => boolean
  release: (ip: string) => void
  releaseOwner: (owner: string) => void
}

export interface StateStore {
  insertVm: (vm: Vm) => void
  updateVm: (vm: Vm) => void
  /** By id, else by name. */
  findVm: (idOrName: string) => Vm | undefined
  listVms: (filter?: VmFilter) => Vm[]
  deleteVm: (id: string) => void
  insertPool: (spec: PoolSpec) => void
  updatePool: (spec: PoolSpec) => void
  listPools: () => PoolSpec[]
  deletePool: (name: string) => void
  putService: (record: StoredService) => void
  listServices: () => StoredService[]
  deleteService: (name: string) => void
  /** A taken name is UIG_ERR_VOLUME_EXISTS. */
  insertVolume: (volume: VolumeRecord) => void
  listVolumes: () => VolumeRecord[]
  findVolume: (name: string) => VolumeRecord | undefined
  deleteVolume: (name: string) => void
  readonly ipAllocations: IpAllocationStore
  close: () => void
}
