import { mkdirSync } from 'node:fs'
import { dirname } from 'node:path'
import Database from 'better-sqlite3'
import { UigniterError } from '../core/errors.js'
import type { PoolSpec } from '../core/pool.js'
import type { ServiceSpec } from '../core/service.js'
import type { StateStore, StoredService, VmFilter } from '../core/ports/state-store.js'
import type { Vm } from '../core/vm.js'
import type { VolumeRecord } from '../core/volume.js'

const SCHEMA_VERSION = 4

/**
 * The daemon's state in an embedded SQLite database (`<dataDir>/uigniter.db`):
 * no server to run. WAL mode keeps readers off the writer's back; each write
 * is one statement or one transaction, so a crash leaves it consistent.
 * VM records are stored whole as JSON, with the columns queries filter on.
 */
export class SqliteStore implements StateStore {
  readonly #db: Database.Database

  constructor (path: string) {
    mkdirSync(dirname(path), { recursive: true })
    this.#db = new Database(path)
    this.#db.pragma('journal_mode = WAL')
    this.#db.pragma('busy_timeout = 5000')
    this.#migrate()
  }

  #migrate (): void {
    const version = this.#db.pragma('user_version', { simple: true }) as number
    if (version > SCHEMA_VERSION) {
      throw new UigniterError('UIG_ERR_STORE', `the database was written by a newer uigniter (schema ${version}); upgrade uigniter`)
    }
    if (version === SCHEMA_VERSION) return
    // Each step takes the schema from its version to the next; a new database runs them all.
    if (version < 1) this.#db.exec(`
      CREATE TABLE IF NOT EXISTS vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        image TEXT NOT NULL,
        created_at TEXT NOT NULL,
        record TEXT NOT NULL
      );
      CREATE TABLE IF NOT EXISTS ip_allocations (
        ip TEXT PRIMARY KEY,
        owner TEXT NOT NULL
      );
      PRAGMA user_version = 1;
    `)
    if (version < 2) this.#db.exec(`
      CREATE TABLE IF NOT EXISTS pools (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL
      );
      PRAGMA user_version = 2;
    `)
    if (version < 3) this.#db.exec(`
      CREATE TABLE IF NOT EXISTS services (
        name TEXT PRIMARY KEY,
        app TEXT,
        generation INTEGER NOT NULL,
        spec TEXT NOT NULL
      );
      PRAGMA user_version = 3;
    `)
    if (version < 4) this.#db.exec(`
      CREATE TABLE IF NOT EXISTS volumes (
        name TEXT PRIMARY KEY,
        record TEXT NOT NULL
      );
      PRAGMA user_version = 4;
    `)
  }

  /** Inserts a new VM; a taken name is UIG_ERR_VM_NAME_IN_USE. */
  insertVm (vm: Vm): void {
    try {
      this.#db.prepare('INSERT INTO vms (id, name, state, image, created_at, record) VALUES (?, ?, ?, ?, ?, ?)')
        .run(vm.id, vm.name, vm.state, vm.image, vm.createdAt, JSON.stringify(vm))
    } catch (err) {
      if ((err as { code?: string }).code === 'SQLITE_CONSTRAINT_UNIQUE') {
        throw new UigniterError('UIG_ERR_VM_NAME_IN_USE', `a VM named "${vm.name}" already exists; choose another name or remove it first`, { cause: err })
      }
      throw err
    }
  }

  updateVm (vm: Vm): void {
    this.#db.prepare('UPDATE vms SET state = ?, record = ? WHERE id = ?').run(vm.state, JSON.stringify(vm), vm.id)
  }

  /** By id, or by name. */
  findVm (idOrName: string): Vm | undefined {
    const row = this.#db.prepare('SELECT record FROM vms WHERE id = ? OR name = ?').get(idOrName, idOrName) as { record: string } | undefined
    return row === undefined ? undefined : parseVm(row.record)
  }

  listVms (filter: VmFilter = {}): Vm[] {
    const where: string[] = []
    const params: string[] = []
    if (filter.state !== undefined && filter.state.length > 0) {
      where.push(`state IN (${filter.state.map(() => '?').join(', ')})`)
      params.push(...filter.state)
    }
    if (filter.image !== undefined) { where.push('image = ?'); params.push(filter.image) }
    if (filter.name !== undefined) { where.push('name = ?'); params.push(filter.name) }
    const sql = `SELECT record FROM vms ${where.length > 0 ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY created_at, id`
    return (this.#db.prepare(sql).all(...params) as Array<{ record: string }>).map((r) => parseVm(r.record))
  }

  deleteVm (id: string): void {
    this.#db.transaction(() => {
      this.#db.prepare('DELETE FROM ip_allocations WHERE owner = ?').run(id)
      this.#db.prepare('DELETE FROM vms WHERE id = ?').run(id)
    })()
  }

  /** Pool specs by name; a taken name is UIG_ERR_POOL_NAME_IN_USE. */
  insertPool (spec: PoolSpec): void {
    const changes = this.#db.prepare('INSERT OR IGNORE INTO pools (name, spec) VALUES (?, ?)').run(spec.name, JSON.stringify(spec)).changes
    if (changes === 0) throw new UigniterError('UIG_ERR_POOL_NAME_IN_USE', `a pool named "${spec.name}" already exists`)
  }

  updatePool (spec: PoolSpec): void {
    this.#db.prepare('UPDATE pools SET spec = ? WHERE name = ?').run(JSON.stringify(spec), spec.name)
  }

  listPools (): PoolSpec[] {
    return (this.#db.prepare('SELECT spec FROM pools ORDER BY name').all() as Array<{ spec: string }>).map((r) => JSON.parse(r.spec) as PoolSpec)
  }

  deletePool (name: string): void {
    this.#db.prepare('DELETE FROM pools WHERE name = ?').run(name)
  }

  /** Services: the declared spec, its application and the generation its replicas should run. */
  putService (record: StoredService): void {
    this.#db.prepare('INSERT INTO services (name, app, generation, spec) VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET app = excluded.app, generation = excluded.generation, spec = excluded.spec')
      .run(record.spec.name, record.app, record.generation, JSON.stringify(record.spec))
  }

  listServices (): StoredService[] {
    return (this.#db.prepare('SELECT app, generation, spec FROM services ORDER BY name').all() as Array<{ app: string | null, generation: number, spec: string }>)
      .map((r) => ({ app: r.app, generation: r.generation, spec: JSON.parse(r.spec) as ServiceSpec }))
  }

  deleteService (name: string): void {
    this.#db.prepare('DELETE FROM services WHERE name = ?').run(name)
  }

  insertVolume (volume: VolumeRecord): void {
    try {
      this.#db.prepare('INSERT INTO volumes (name, record) VALUES (?, ?)').run(volume.name, JSON.stringify(volume))
    } catch (err) {
      if ((err as { code?: string }).code === 'SQLITE_CONSTRAINT_PRIMARYKEY') {
        throw new UigniterError('UIG_ERR_VOLUME_EXISTS', `a volume named "${volume.name}" exists already; choose another name, or remove it first`, { cause: err })
      }
      throw err
    }
  }

  listVolumes (): VolumeRecord[] {
    return (this.#db.prepare('SELECT record FROM volumes ORDER BY name').all() as Array<{ record: string }>).map((r) => JSON.parse(r.record) as VolumeRecord)
  }

  findVolume (name: string): VolumeRecord | undefined {
    const row = this.#db.prepare('SELECT record FROM volumes WHERE name = ?').get(name) as { record: string } | undefined
    return row === undefined ? undefined : JSON.parse(row.record) as VolumeRecord
  }

  deleteVolume (name: string): void {
    this.#db.prepare('DELETE FROM volumes WHERE name = ?').run(name)
  }

  /** IP allocations: the UNIQUE primary key makes `reserve` atomic across processes. */
  readonly ipAllocations = {
    list: (): Array<{ ip: string, owner: string }> =>
      this.#db.prepare('SELECT ip, owner FROM ip_allocations ORDER BY ip').all() as Array<{ ip: string, owner: string }>,
    reserve: (ip: string, owner: string): boolean =>
      this.#db.prepare('INSERT OR IGNORE INTO ip_allocations (ip, owner) VALUES (?, ?)').run(ip, owner).changes === 1,
    release: (ip: string): void => { this.#db.prepare('DELETE FROM ip_allocations WHERE ip = ?').run(ip) },
    releaseOwner: (owner: string): void => { this.#db.prepare('DELETE FROM ip_allocations WHERE owner = ?').run(owner) }
  }

  close (): void {
    this.#db.close()
  }
}

/** Records written before a field existed get its empty value. */
function parseVm (record: string): Vm {
  return { pool: null, startPath: 'cold', template: null, startTimings: null, service: null, ...(JSON.parse(record) as Partial<Vm>) } as Vm
}
