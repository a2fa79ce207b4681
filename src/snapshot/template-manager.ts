import { EventEmitter } from 'node:events'
import { readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { Value } from '@sinclair/typebox/value'
import { describeSchemaErrors } from '../core/config.js'
import { UigniterError } from '../core/errors.js'
import { formatImageRef, type ImageManifest } from '../core/image.js'
import type { Logger } from '../core/logger.js'
import { TemplateSpecSchema, type TemplateInfo, type TemplateSpec } from '../core/template.js'
import type { GuestLaunches } from '../vm/guest-launches.js'
import type { ImageRepository } from '../core/ports/image-repository.js'
import type { StateStore } from '../core/ports/state-store.js'
import type { VmmDriver } from '../core/ports/vmm-driver.js'
import { resolveAfterClone, type ResolvedAfterClone } from './after-clone.js'
import { Template } from './template.js'

export interface TemplateManagerDeps {
  dataDir: string
  store: StateStore
  images: ImageRepository
  driver: VmmDriver
  launches: GuestLaunches
  /** bridge when the daemon makes taps: the template's NIC backend, which its clones must share. */
  network: 'bridge' | 'user'
  log: Logger
}

const LIVE = ['starting', 'running', 'paused', 'stopping'] as const

/**
 * What the API's event stream relays: a template being made (its name only),
 * made, or deleted; and, after `created`, `template.clone-unsafe` for a
 * `ready: app` template whose clones will share the app's state.
 */
export type TemplateEvent =
  | { type: 'template.creating' | 'template.created' | 'template.deleted', template: TemplateInfo | { name: string } }
  | { type: 'template.clone-unsafe', template: { name: string, image: string, warning: string } }

/**
 * The daemon's templates: made from an image on request, kept as files in
 * `<dataDir>/templates/<name>/` (so they outlive the daemon), cloned by
 * VmManager, and deleted only when nothing maps them any more. Events
 * ('template' → { type, template }) feed the API's server-sent events.
 */
export class TemplateManager extends EventEmitter {
  readonly #deps: TemplateManagerDeps
  /** Names being made or deleted: a second request for the same name waits for nobody and is refused. */
  readonly #busy = new Set<string>()

  constructor (deps: TemplateManagerDeps) {
    super()
    this.#deps = deps
  }

  /**
   * After a daemon (re)start: a template whose making was cut short has no
   * template.json; its VM, if still running, is killed and its files removed.
   */
  async recover (): Promise<number> {
    let removed = 0
    for (const name of await this.#names()) {
      if (await this.#complete(name)) continue
      const vmDir = join(Template.dirOf(this.#deps.dataDir, name), 'vm')
      const found = await this.#deps.driver.adopt(vmDir).catch(() => undefined)
      if (found !== undefined && !('dead' in found)) { found.kill(); await found.exited }
      await this.#deps.launches.release(templateOwner(name)).catch(() => {})
      await Template.discard(this.#deps.dataDir, name)
      this.#deps.log.warn({ template: name }, 'removed a template whose making was interrupted')
      removed++
    }
    return removed
  }

  /**
   * Validates the request, boots the image and snapshots it at its ready
   * point. Resolves once the template can be cloned (tens of seconds for a
   * slow app under TCG).
   */
  async create (input: unknown): Promise<TemplateInfo> {
    const spec = Value.Default(TemplateSpecSchema, structuredClone(input))
    if (!Value.Check(TemplateSpecSchema, spec)) throw new UigniterError('UIG_ERR_TEMPLATE_INVALID', `invalid template: ${describeSchemaErrors(TemplateSpecSchema, spec)}`)
    const manifest = await this.#deps.images.get(spec.image)
    const ready = spec.ready ?? 'init'
    const port = spec.port ?? manifest.ports[0]?.port
    if (ready === 'app' && port === undefined) {
      throw new UigniterError('UIG_ERR_TEMPLATE_INVALID', `image ${formatImageRef(manifest)} declares no port: give the port that answers when its app is ready, or use ready: init`)
    }
    if (spec.httpPath !== undefined && ready !== 'app') throw new UigniterError('UIG_ERR_TEMPLATE_INVALID', 'httpPath is the ready: app health check; ready: init takes none')
    if (manifest.init === null) throw new UigniterError('UIG_ERR_TEMPLATE_INVALID', `image ${formatImageRef(manifest)} has no uigniter init (a bring-your-own kernel or unikernel): a clone could not take its own identity`)
    const { afterClone, cloneSafe } = cloneSafety(manifest, ready, spec.afterClone, port)
    if (this.#busy.has(spec.name) || await this.#complete(spec.name)) {
      throw new UigniterError('UIG_ERR_TEMPLATE_NAME_IN_USE', `a template named "${spec.name}" exists or is being made; delete it first or choose another name`)
    }
    this.#busy.add(spec.name)
    const owner = templateOwner(spec.name)
    let made = true
    try {
      const { launch, attachment } = await this.#deps.launches.prepare(owner, manifest, {
        vcpus: spec.vcpus ?? manifest.vcpus,
        memoryMiB: spec.memoryMiB ?? manifest.memoryMiB,
        hostname: spec.name,
        network: this.#deps.network,
        // In user mode the host reaches the app through a forward on a free port.
        publish: this.#deps.network === 'user' && port !== undefined ? [{ hostAddress: '127.0.0.1', hostPort: 0, guestPort: port }] : [],
        env: spec.env,
        ...(spec.args !== undefined ? { args: spec.args } : {})
      })
      const forward = launch.network.mode === 'user' ? launch.network.forwards[0] : undefined
      const probe = port === undefined
        ? undefined
        : {
            host: forward !== undefined ? '127.0.0.1' : attachment.ipAddress ?? '',
            port: forward?.hostPort ?? port,
            guestPort: port,
            ...(spec.httpPath !== undefined ? { httpPath: spec.httpPath } : {})
          }
      this.#emit({ type: 'template.creating', template: { name: spec.name } })
      const template = await Template.create(this.#deps.driver, {
        id: spec.name,
        dataDir: this.#deps.dataDir,
        launch,
        ready,
        bootTimeoutMs: spec.timeoutMs,
        afterClone,
        cloneSafe,
        ...(ready === 'app' && probe !== undefined ? { probe } : {})
      })
      const info = await this.#info(template)
      this.#deps.log.info({ template: spec.name, timings: template.record.timings }, 'template made')
      this.#emit({ type: 'template.created', template: info })
      for (const warning of info.warnings) {
        this.#deps.log.warn({ template: spec.name, image: info.image }, warning)
        this.#emit({ type: 'template.clone-unsafe', template: { name: spec.name, image: info.image, warning } })
      }
      return info
    } catch (err) {
      made = false
      throw err
    } finally {
      // A made template keeps its address until it is deleted: every clone wakes up with it (and the
      // template's MAC) until it takes its own identity, so a VM given that address meanwhile would
      // lose its traffic to each new clone for a moment (seen: replicas failing health checks).
      await this.#deps.launches.release(owner, { keepAddress: made }).catch((err: unknown) => { this.#deps.log.warn({ err, template: spec.name }, 'releasing the template VM\'s network failed') })
      this.#busy.delete(spec.name)
    }
  }

  /** A template ready to clone; throws UIG_ERR_TEMPLATE_NOT_FOUND (also while it is being made or deleted). */
  async open (name: string): Promise<Template> {
    if (this.#busy.has(name)) throw new UigniterError('UIG_ERR_TEMPLATE_NOT_FOUND', `template "${name}" is being made or deleted`)
    if (!/^[a-z0-9][a-z0-9_.-]{0,62}$/.test(name)) throw new UigniterError('UIG_ERR_TEMPLATE_NOT_FOUND', `no template is named "${name}"; "uigniter template ls" lists them`)
    return await Template.open(this.#deps.dataDir, name)
  }

  async get (name: string): Promise<TemplateInfo> {
    return await this.#info(await this.open(name))
  }

  async list (): Promise<TemplateInfo[]> {
    const out: TemplateInfo[] = []
    for (const name of await this.#names()) {
      if (this.#busy.has(name) || !await this.#complete(name)) continue
      out.push(await this.#info(await Template.open(this.#deps.dataDir, name)))
    }
    return out
  }

  /**
   * Deletes a template and its RAM file. Refused (UIG_ERR_TEMPLATE_IN_USE)
   * while live clones map its RAM or a clone pool is made from it: the
   * clones would keep running, but a pool could no longer refill.
   */
  async remove (name: string): Promise<TemplateInfo> {
    const template = await this.open(name)
    const clones = this.liveClones(name)
    if (clones.length > 0) {
      const shown = clones.slice(0, 5).join(', ') + (clones.length > 5 ? ` and ${clones.length - 5} more` : '')
      throw new UigniterError('UIG_ERR_TEMPLATE_IN_USE', `template "${name}" has ${clones.length} live clone(s) (${shown}); stop or remove them first`)
    }
    const pools = this.#deps.store.listPools().filter((p) => p.template === name).map((p) => p.name)
    if (pools.length > 0) throw new UigniterError('UIG_ERR_TEMPLATE_IN_USE', `clone pool(s) ${pools.join(', ')} are made from template "${name}"; delete them first`)
    const info = await this.#info(template)
    this.#busy.add(name)
    try {
      await template.remove()
      await this.#deps.launches.release(templateOwner(name))
    } finally {
      this.#busy.delete(name)
    }
    this.#emit({ type: 'template.deleted', template: info })
    return info
  }

  /** Names of the live VMs cloned from the template. */
  liveClones (name: string): string[] {
    return this.#deps.store.listVms({ state: [...LIVE] }).filter((vm) => vm.template === name).map((vm) => vm.name)
  }

  #emit (event: TemplateEvent): void {
    this.emit('template', event)
  }

  async #info (template: Template): Promise<TemplateInfo> {
    const { record } = template
    const { launch } = record
    return {
      name: template.id,
      image: formatImageRef(launch.manifest),
      imageDigest: launch.manifest.digest,
      ready: record.ready,
      port: record.probe?.port ?? null,
      httpPath: record.probe?.httpPath ?? null,
      vcpus: launch.vcpus,
      memoryMiB: launch.memoryMiB,
      network: launch.network.mode === 'tap' ? 'bridge' : 'user',
      createdAt: record.createdAt,
      timings: record.timings,
      memoryPath: record.memoryPath,
      stateBytes: await stat(record.statePath).then((s) => s.size, () => 0),
      clones: this.liveClones(template.id).length,
      afterClone: record.afterClone,
      cloneSafe: record.cloneSafe,
      warnings: record.cloneSafe ? [] : [cloneUnsafeWarning(formatImageRef(launch.manifest))]
    }
  }

  async #names (): Promise<string[]> {
    const entries = await readdir(join(this.#deps.dataDir, 'templates'), { withFileTypes: true }).catch(() => [])
    return entries.filter((e) => e.isDirectory()).map((e) => e.name).sort()
  }

  async #complete (name: string): Promise<boolean> {
    return await stat(join(Template.dirOf(this.#deps.dataDir, name), 'template.json')).then(() => true, () => false)
  }
}

/**
 * A template's hook and whether its clones are safe to hand out as separate
 * instances: `ready: init` clones start their app after the identity (a new
 * process); a `ready: app` template is safe with a hook (the template's, or
 * else the image's), or with an image built clone-safe without one. The
 * template's `afterClone` replaces the image's; null drops it.
 * Throws UIG_ERR_TEMPLATE_INVALID for a hook that cannot run.
 */
export function cloneSafety (manifest: ImageManifest, ready: 'init' | 'app', asked: TemplateSpec['afterClone'], port: number | undefined): { afterClone: ResolvedAfterClone | null, cloneSafe: boolean } {
  if (ready === 'init') {
    if (asked !== undefined && asked !== null) throw new UigniterError('UIG_ERR_TEMPLATE_INVALID', 'afterClone is for ready: app; a ready: init clone starts its app after taking its identity, as a new instance')
    return { afterClone: null, cloneSafe: true }
  }
  const hook = asked === undefined ? manifest.afterClone : asked
  const afterClone = hook === undefined || hook === null ? null : resolveAfterClone(hook, port)
  if (afterClone?.kind === 'signal' && (manifest.init?.version ?? 0) < 2) {
    throw new UigniterError('UIG_ERR_TEMPLATE_INVALID', `image ${formatImageRef(manifest)} was built with a guest init older than after-clone signals (version ${manifest.init?.version ?? 0}); rebuild the image`)
  }
  return { afterClone, cloneSafe: afterClone !== null || (manifest.cloneSafe === true && manifest.afterClone === undefined) }
}

export function cloneUnsafeWarning (image: string): string {
  return `clones of this ready: app template start with the memory of its app, and image ${image} is neither clone-safe nor has an after-clone hook: ` +
    'generators the app keeps in its own memory (crypto.randomBytes and randomUUID in Node, Math.random, a seeded PRNG, ids made at start-up) return the same values in every clone. ' +
    'Give the template or the image an afterClone hook, build the image as a Node.js source (clone-safe), or use ready: init'
}

/** The network owner (tap, address) of a template's VM while it is made; never a VM id (those are hex). */
export function templateOwner (name: string): string {
  return `template:${name}`
}

