import type { Logger } from '../core/logger.js'
import type { ClusterStore, ClusterWatch } from '../core/ports/cluster-store.js'

/**
 * A local copy of every key under a prefix, kept current by a watch (list,
 * then watch from the listing's revision; list again when the watch had to
 * reset). Values that do not parse are dropped with a warning: the store is
 * shared, and one bad record must not stop a node. While the store is
 * unreachable the copy keeps the last state it saw, which is what lets
 * gateways and agents go on serving.
 */
export class Informer<T> {
  readonly items = new Map<string, T>()
  readonly #store: ClusterStore
  readonly #prefix: string
  readonly #parse: (value: string, key: string) => T
  readonly #onChange: (key: string, value: T | undefined, previous: T | undefined) => void
  readonly #log: Logger
  #watch: ClusterWatch | undefined
  #closed = false
  #synced = false

  constructor (options: { store: ClusterStore, prefix: string, parse: (value: string, key: string) => T, onChange?: (key: string, value: T | undefined, previous: T | undefined) => void, log: Logger }) {
    this.#store = options.store
    this.#prefix = options.prefix
    this.#parse = options.parse
    this.#onChange = options.onChange ?? (() => {})
    this.#log = options.log
  }

  get synced (): boolean { return this.#synced }

  /** Lists and starts watching; retries the listing until the store answers. */
  async start (): Promise<void> {
    for (;;) {
      try {
        await this.#resync()
        return
      } catch (err) {
        if (this.#closed) return
        this.#log.warn({ err, prefix: this.#prefix }, 'cannot list cluster state yet; retrying')
        await new Promise((resolve) => setTimeout(resolve, 1000))
      }
    }
  }

  close (): void {
    this.#closed = true
    this.#watch?.close()
  }

  async #resync (): Promise<void> {
    this.#watch?.close()
    const { items, revision } = await this.#store.list(this.#prefix)
    const seen = new Set<string>()
    for (const kv of items) {
      seen.add(kv.key)
      this.#set(kv.key, kv.value)
    }
    for (const key of [...this.items.keys()]) if (!seen.has(key)) this.#delete(key)
    this.#synced = true
    if (this.#closed) return
    this.#watch = this.#store.watch(this.#prefix, revision, (changes) => {
      for (const change of changes) {
        if (change.type === 'put') this.#set(change.kv.key, change.kv.value)
        else this.#delete(change.key)
      }
    }, () => { void this.start() })
  }

  #set (key: string, raw: string): void {
    let value: T
    try {
      value = this.#parse(raw, key)
    } catch (err) {
      this.#log.warn({ err, key }, `ignoring a cluster record that does not parse: ${(err as Error).message}`)
      this.#delete(key)
      return
    }
    const previous = this.items.get(key)
    this.items.set(key, value)
    this.#notify(key, value, previous)
  }

  #delete (key: string): void {
    const previous = this.items.get(key)
    if (previous === undefined) return
    this.items.delete(key)
    this.#notify(key, undefined, previous)
  }

  #notify (key: string, value: T | undefined, previous: T | undefined): void {
    try {
      this.#onChange(key, value, previous)
    } catch (err) {
      this.#log.error({ err, key }, 'handling a cluster change failed')
    }
  }
}
