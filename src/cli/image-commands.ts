import { readFile } from 'node:fs/promises'
import { dirname, resolve } from 'node:path'
import { UigniterError, hasErrno } from '../core/errors.js'
import { formatImageRef, parseImageRef, type ImageManifest } from '../core/image.js'
import { Progress, formatBytes, formatDuration } from '../core/progress.js'
import { readImageArchive } from '../oci/image-archive.js'
import { imageFromPull, type PulledImageOptions } from '../oci/pulled-image.js'
import { pull } from '../oci/pull.js'
import { parseReference, type OciReference } from '../oci/reference.js'
import { httpGetWithRetry } from '../core/app-probe.js'
import { BootedImage } from '../vmm/qemu/image-boot.js'
import { parseEnv, parseIntFlag, parseMiB, printTable, type Command } from './args.js'
import { createContext } from './context.js'

/** Turns `image build` flags into a build spec; the builder validates it like a spec file. */
async function specFromFlags (values: Record<string, unknown>, args: string[]): Promise<{ spec: Record<string, unknown>, baseDir: string }> {
  const str = (k: string): string | undefined => values[k] as string | undefined
  let spec: Record<string, unknown> = {}
  let baseDir = process.cwd()
  const file = str('file')
  if (file !== undefined) {
    try {
      spec = JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>
    } catch (err) {
      if (hasErrno(err, 'ENOENT')) throw new UigniterError('UIG_ERR_IMAGE_PATH_NOT_FOUND', `spec file ${file} does not exist`)
      throw new UigniterError('UIG_ERR_IMAGE_SPEC_INVALID', `spec file ${file} is not valid JSON: ${(err as Error).message}`)
    }
    baseDir = dirname(resolve(file))
  }
  const sources = ['elf', 'node', 'rootfs', 'kernel'].filter((k) => str(k) !== undefined)
  if (sources.length > 1) throw new UigniterError('UIG_ERR_CLI_USAGE', `give one source, not ${sources.map((s) => `--${s}`).join(' and ')}`)
  if (str('elf') !== undefined) spec.source = { kind: 'elf', path: str('elf'), args }
  if (str('node') !== undefined) spec.source = { kind: 'node', dir: str('node'), entry: str('entry') ?? 'index.js', args }
  if (str('rootfs') !== undefined) spec.source = { kind: 'rootfs', dir: str('rootfs'), entrypoint: str('entrypoint'), args }
  if (str('kernel') !== undefined) {
    spec.source = { kind: 'unikernel', kernel: str('kernel'), cmdline: str('cmdline') ?? '', ...(str('disk') !== undefined ? { disk: str('disk') } : {}) }
  }
  if (spec.source === undefined) throw new UigniterError('UIG_ERR_CLI_USAGE', 'give a source: -f SPEC, --elf, --node, --rootfs or --kernel')
  if (str('name') !== undefined) spec.name = str('name')
  if (str('format') !== undefined) spec.format = str('format')
  if (str('workdir') !== undefined) spec.workdir = str('workdir')
  if (str('cpus') !== undefined) spec.vcpus = parseIntFlag(str('cpus') ?? '', '--cpus', 1, 64)
  if (str('memory') !== undefined) spec.memoryMiB = parseMiB(str('memory') ?? '', '--memory')
  if (str('machine') !== undefined) {
    spec.machine = { type: str('machine'), transport: str('machine') === 'microvm' ? 'mmio' : 'pci' }
  }
  const env = parseEnv(values.env as string[] | undefined)
  if (Object.keys(env).length > 0) spec.env = { ...(spec.env as Record<string, string> | undefined), ...env }
  const ports = (values.port as string[] | undefined) ?? []
  if (ports.length > 0) {
    spec.ports = ports.map((p) => {
      const [port = '', protocol = 'tcp'] = p.split('/')
      return { port: parseIntFlag(port, '--port', 1, 65535), protocol }
    })
  }
  return { spec, baseDir }
}

/** The flags `image pull` and `image import` share: how the image is made from the layers. */
const CONVERSION_OPTIONS = {
  name: { type: 'string', short: 't' },
  format: { type: 'string' },
  memory: { type: 'string' },
  overlay: { type: 'string' },
  json: { type: 'boolean' }
} as const
const CONVERSION_HELP = [
  '--format F            auto (squashfs) | squashfs | ext4',
  '--memory M            default memory of its VMs (MiB, or 512M, 1G)',
  '--overlay M           the writable overlay its booted VMs get (default 256 MiB): container images write to their root',
  '--json                print the manifest as JSON'
]

/** Those flags checked, as imageFromPull takes them; `asked` is false when none was given. */
function conversionFlags (values: Record<string, unknown>): { options: Pick<PulledImageOptions, 'format' | 'memoryMiB' | 'overlaySizeMiB'>, asked: boolean } {
  const format = values.format as string | undefined
  if (format !== undefined && !['auto', 'squashfs', 'ext4'].includes(format)) throw new UigniterError('UIG_ERR_CLI_USAGE', `--format takes auto, squashfs or ext4, not "${format}"`)
  return {
    options: {
      ...(format !== undefined ? { format: format as 'auto' | 'squashfs' | 'ext4' } : {}),
      ...(values.memory !== undefined ? { memoryMiB: parseMiB(values.memory as string, '--memory') } : {}),
      ...(values.overlay !== undefined ? { overlaySizeMiB: parseMiB(values.overlay as string, '--overlay') } : {})
    },
    asked: format !== undefined || values.memory !== undefined || values.overlay !== undefined
  }
}

/** The manifest as JSON with --json, else the line saying what was done and the summary. */
function printMade (values: Record<string, unknown>, manifest: ImageManifest, line: string): void {
  if (values.json === true) console.log(JSON.stringify(manifest, null, 2))
  else {
    console.log(line)
    printManifestSummary(manifest)
  }
}

function printManifestSummary (m: ImageManifest): void {
  console.log(`${formatImageRef(m)}  ${m.digest.slice(0, 19)}  ${m.format}  ${formatBytes(m.size)}`)
}

/** The flags of `image pull` that reach the registry; `uigniter up` takes them too. */
export const REGISTRY_OPTIONS = { insecure: { type: 'boolean' }, credentials: { type: 'string' } } as const
export const REGISTRY_HELP = [
  '--insecure            plain HTTP to the registry (e.g. 127.0.0.1:5000); https otherwise, unless the config\'s registries.insecure names it',
  '--credentials FILE    registry credentials in Docker\'s config.json format (auths → auth); default: the config\'s registries.credentials'
]

export interface RegistryFlags {
  insecure?: boolean
  credentialsFile?: string
}

export function registryFlags (values: Record<string, unknown>): RegistryFlags {
  return {
    ...(values.insecure === true ? { insecure: true } : {}),
    ...(values.credentials !== undefined ? { credentialsFile: values.credentials as string } : {})
  }
}

/**
 * Whether an image named in an application file is a registry reference
 * rather than a local image: its first path component is a host, as docker
 * reads it (a `.` or a `:` in it, or `localhost`). `localhost:5000/redis:7`
 * and `registry.example.com/team/api:1.2` are; `redis:7` and `team/api` are
 * local names, as `image build -t` makes them.
 */
export function isRegistryReference (image: string): boolean {
  const slash = image.indexOf('/')
  if (slash < 0) return false
  const first = image.slice(0, slash)
  return first.includes('.') || first.includes(':') || first === 'localhost' || first.startsWith('[')
}

/** The local name a pull gives an image when none is asked for: the repository's last part and the tag (`redis:7`). */
export function localNameFor (reference: OciReference): string {
  return `${reference.repository.split('/').pop() ?? reference.repository}:${reference.tag ?? 'latest'}`
}

export interface PulledImage {
  manifest: ImageManifest
  /** Kept as it was: made before from this very manifest, with nothing asked differently. */
  unchanged: boolean
  /** What was done, for the user: pulled what from where, how many layers fetched, as which image. */
  line: string
}

/**
 * Pulls `ref` into the blob cache and makes a bootable image of it, named
 * `options.name` or localNameFor(ref). Pulled again with no conversion flag
 * given, the image already made from the same manifest digest is kept, not
 * made again (the conversion is most of a cached pull's time). `image pull`
 * and `uigniter up` (for a service whose image is a registry reference) both
 * pull through here. Progress per layer on a terminal, silent otherwise.
 * @example
 * const { manifest } = await pullImage('127.0.0.1:5000/redis:7', { insecure: true })
 * manifest.name // 'redis'
 */
export async function pullImage (ref: string, options: RegistryFlags & { name?: string, conversion?: ReturnType<typeof conversionFlags> } = {}): Promise<PulledImage> {
  const conversion = options.conversion ?? { options: {}, asked: false }
  const reference = parseReference(ref)
  const name = options.name ?? localNameFor(reference)
  parseImageRef(name)
  const { config, store, builder } = createContext()
  const started = Date.now()
  const progress = new Progress(`pulling ${ref}`)
  const work = await store.createWorkDir()
  try {
    const pulled = await pull(reference, {
      dataDir: config.dataDir,
      // --insecure for this one pull, or the registries the config names.
      insecure: options.insecure === true ? true : config.registries.insecure,
      ...(options.credentialsFile !== undefined || config.registries.credentials !== undefined
        ? { credentialsFile: options.credentialsFile ?? config.registries.credentials }
        : {}),
      onProgress: (p) => { progress.update(`layer ${p.index + 1}/${p.count} ${p.digest.slice(7, 19)}: ${p.state === 'cached' ? 'cached' : `${formatBytes(p.received)} of ${formatBytes(p.size)}`}`) }
    })
    // Pulled again with nothing asked differently: the image made from this very manifest is kept, not made again.
    const existing = await store.get(name).catch(() => undefined)
    const unchanged = existing?.origin?.manifestDigest === pulled.manifestDigest && !conversion.asked
    progress.update(unchanged ? 'up to date' : `applying ${pulled.layers.length} layer(s)`)
    const manifest = unchanged && existing !== undefined ? existing : await imageFromPull(pulled, { builder, name, workParent: work, ...conversion.options })
    const line = `pulled ${pulled.reference} (${pulled.manifestDigest.slice(0, 19)}, ${pulled.layers.length} layer(s): ${pulled.stats.fetched} fetched, ${pulled.stats.cached} cached) as ${formatImageRef(manifest)}${unchanged ? ', already made from this manifest' : ''} in ${formatDuration(Date.now() - started)}`
    return { manifest, unchanged, line }
  } finally {
    progress.done()
    await store.discardWorkDir(work)
  }
}

export const imageCommands: Command[] = [
  {
    name: 'image build',
    summary: 'Build a single-app image from an ELF executable, a Node.js app, a root directory, or your own unikernel.',
    usage: 'uigniter image build (-f SPEC.json | --elf PATH | --node DIR [--entry FILE] | --rootfs DIR --entrypoint PATH | --kernel FILE [--disk FILE] [--cmdline TEXT]) [-t NAME[:TAG]] [options] [-- APP ARGS...]',
    options: {
      file: { type: 'string', short: 'f' },
      name: { type: 'string', short: 't' },
      elf: { type: 'string' },
      node: { type: 'string' },
      entry: { type: 'string' },
      rootfs: { type: 'string' },
      entrypoint: { type: 'string' },
      kernel: { type: 'string' },
      disk: { type: 'string' },
      cmdline: { type: 'string' },
      machine: { type: 'string' },
      format: { type: 'string' },
      env: { type: 'string', short: 'e', multiple: true },
      workdir: { type: 'string' },
      cpus: { type: 'string' },
      memory: { type: 'string' },
      port: { type: 'string', multiple: true },
      json: { type: 'boolean' }
    },
    help: [
      '-f, --file SPEC       a JSON build spec (see docs/images.md); paths in it are relative to its directory',
      '-t, --name NAME:TAG   image name (tag defaults to "latest")',
      '--elf PATH            an ELF executable; its shared libraries are resolved from the ELF',
      '--node DIR            a Node.js app directory (with node_modules); --entry FILE (default index.js)',
      '--rootfs DIR          a root file system; --entrypoint /path/inside/DIR',
      '--kernel FILE         bring your own unikernel; --disk FILE, --cmdline TEXT, --machine microvm|q35|pc',
      '--cmdline TEXT        the unikernel\'s command line; {ip} {prefix} {netmask} {gateway} {dns} {hostname} are filled per VM, {{ and }} are braces',
      '--format F            auto (default) | initramfs | squashfs | ext4',
      '-e, --env K=V         environment of the app (repeatable)',
      '--workdir DIR         working directory of the app',
      '--cpus N, --memory M  default vCPUs and memory (MiB, or 512M, 1G)',
      '--port P[/http|tcp]   a port the app exposes (repeatable)',
      '--json                print the manifest as JSON'
    ],
    run: async (values, positionals) => {
      const { builder } = createContext()
      const { spec, baseDir } = await specFromFlags(values, positionals)
      const started = Date.now()
      const manifest = await builder.build(spec, baseDir)
      printMade(values, manifest, `built ${formatImageRef(manifest)} in ${formatDuration(Date.now() - started)}`)
      return 0
    }
  },
  {
    name: 'image pull',
    summary: 'Pull an image from an OCI registry and make it a bootable image (layers applied, its config mapped, our init added).',
    usage: 'uigniter image pull REF [-t NAME[:TAG]] [--insecure] [--credentials FILE] [--format auto|squashfs|ext4] [--memory M] [--overlay M] [--json]',
    options: { ...CONVERSION_OPTIONS, ...REGISTRY_OPTIONS },
    help: [
      'REF                   [registry/]name[:tag|@sha256:...]; without a registry, docker.io (library/ for one-part names)',
      '-t, --name NAME:TAG   the local image name (default: the reference\'s last path part and its tag)',
      ...REGISTRY_HELP,
      ...CONVERSION_HELP
    ],
    run: async (values, positionals) => {
      const ref = positionals[0]
      if (ref === undefined || positionals.length > 1) throw new UigniterError('UIG_ERR_CLI_USAGE', 'give one image reference: uigniter image pull REF')
      const made = await pullImage(ref, {
        ...registryFlags(values),
        ...(values.name !== undefined ? { name: values.name as string } : {}),
        conversion: conversionFlags(values)
      })
      printMade(values, made.manifest, made.line)
      return 0
    }
  },
  {
    name: 'image import',
    summary: 'Import an image archive (an OCI image layout, as a directory or a tar, or a docker save archive) and make it a bootable image.',
    usage: 'uigniter image import FILE|DIR [-t NAME[:TAG]] [--ref TAG] [--format auto|squashfs|ext4] [--memory M] [--overlay M] [--json]',
    options: { ...CONVERSION_OPTIONS, ref: { type: 'string' } },
    help: [
      'FILE|DIR              an OCI image layout directory, a tar of one (skopeo ... oci-archive:), or a docker save tar',
      '-t, --name NAME:TAG   the local image name (default: the archive\'s own name and tag)',
      '--ref TAG             which image of an archive that holds several (an OCI ref.name, or a docker RepoTag)',
      ...CONVERSION_HELP
    ],
    run: async (values, positionals) => {
      const path = positionals[0]
      if (path === undefined || positionals.length > 1) throw new UigniterError('UIG_ERR_CLI_USAGE', 'give one archive: uigniter image import FILE|DIR')
      const conversion = conversionFlags(values)
      const given = values.name as string | undefined
      if (given !== undefined) parseImageRef(given)
      const { config, store, builder } = createContext()
      const started = Date.now()
      const progress = new Progress(`importing ${path}`)
      const work = await store.createWorkDir()
      try {
        const imported = await readImageArchive(path, {
          dataDir: config.dataDir,
          ...(values.ref !== undefined ? { ref: values.ref as string } : {})
        })
        const name = given ?? imported.imageName
        if (name === undefined) throw new UigniterError('UIG_ERR_CLI_USAGE', `${path} gives its image no name usable here: name it with -t NAME[:TAG]`)
        progress.update(`applying ${imported.layers.length} layer(s)`)
        const manifest = await imageFromPull(imported, { builder, name, workParent: work, ...conversion.options })
        progress.done()
        printMade(values, manifest, `imported ${imported.reference} (${imported.manifestDigest.slice(0, 19)}, ${imported.layers.length} layer(s)) as ${formatImageRef(manifest)} in ${formatDuration(Date.now() - started)}`)
        return 0
      } finally {
        progress.done()
        await store.discardWorkDir(work)
      }
    }
  },
  {
    name: 'image ls',
    summary: 'List images.',
    usage: 'uigniter image ls [--json]',
    options: { json: { type: 'boolean' } },
    help: ['--json   print the manifests as JSON'],
    run: async (values) => {
      const images = await createContext().store.list()
      if (values.json === true) console.log(JSON.stringify(images, null, 2))
      else printTable(['NAME', 'TAG', 'DIGEST', 'FORMAT', 'SIZE', 'CREATED'],
        images.map((m) => [m.name, m.tag, m.digest.slice(7, 19), m.format, formatBytes(m.size), m.createdAt]))
      return 0
    }
  },
  {
    name: 'image inspect',
    summary: 'Print an image\'s manifest as JSON.',
    usage: 'uigniter image inspect NAME[:TAG]',
    options: {},
    help: [],
    run: async (_values, positionals) => {
      const ref = requireOne(positionals, 'uigniter image inspect NAME[:TAG]')
      console.log(JSON.stringify(await createContext().store.get(ref), null, 2))
      return 0
    }
  },
  {
    name: 'image rm',
    summary: 'Remove images; blobs no other image uses are deleted.',
    usage: 'uigniter image rm NAME[:TAG]...',
    options: {},
    help: [],
    run: async (_values, positionals) => {
      if (positionals.length === 0) throw new UigniterError('UIG_ERR_CLI_USAGE', 'usage: uigniter image rm NAME[:TAG]...')
      const { store } = createContext()
      for (const ref of positionals) console.log(`removed ${formatImageRef(await store.remove(ref))}`)
      return 0
    }
  },
  {
    name: 'image test',
    summary: 'Boot an image once under QEMU (user-mode network), show its console, and report whether the app started and how it exited.',
    usage: 'uigniter image test NAME[:TAG] [-p HOST:GUEST]... [--http PORT[/PATH]] [--timeout SECONDS] [--quiet]',
    options: {
      publish: { type: 'string', short: 'p', multiple: true },
      http: { type: 'string' },
      timeout: { type: 'string' },
      quiet: { type: 'boolean', short: 'q' }
    },
    help: [
      '-p, --publish H:G   forward 127.0.0.1:H on the host to port G in the guest (repeatable)',
      '--http PORT[/PATH]  once the app started, GET PATH on the guest\'s PORT, print the answer, then stop the guest',
      '--timeout SECONDS   stop the guest gracefully after this long (default: wait for the app to exit)',
      '-q, --quiet         do not echo the guest console'
    ],
    run: async (values, positionals) => {
      const ctx = createContext()
      const manifest = await ctx.store.get(requireOne(positionals, 'uigniter image test NAME[:TAG]'))
      const forwards = ((values.publish as string[] | undefined) ?? []).map((p) => {
        const m = /^(\d+):(\d+)$/.exec(p)
        if (m === null) throw new UigniterError('UIG_ERR_CLI_USAGE', `--publish takes HOST:GUEST ports, not "${p}"`)
        return { hostPort: parseIntFlag(m[1] ?? '', '--publish', 1, 65535), guestPort: parseIntFlag(m[2] ?? '', '--publish', 1, 65535) }
      })
      const httpCheck = parseHttpFlag(values.http as string | undefined)
      if (httpCheck !== undefined) forwards.push({ hostPort: 0, guestPort: httpCheck.port })
      const timeoutS = values.timeout === undefined ? undefined : parseIntFlag(values.timeout as string, '--timeout', 1, 86400)
      const booted = await BootedImage.start({ config: ctx.config, store: ctx.store, manifest, forwards })
      const say = (text: string): void => { process.stderr.write(`uigniter: ${text}\n`) }
      say(`booting ${formatImageRef(manifest)} (${manifest.format}, ${booted.accel.accel}: ${booted.accel.reason})`)
      if (values.quiet !== true) booted.on('line', (line: string) => { process.stdout.write(line + '\n') })
      const onSignal = (): void => { void booted.shutdown() }
      process.once('SIGINT', onSignal)
      process.once('SIGTERM', onSignal)
      let failed = false
      try {
        if (manifest.init !== null) {
          await booted.waitForMarker('app-started', 120_000)
          const t = booted.timings
          // The marker may resolve the wait before this process's own console reader saw its line.
          const started = t.appStartedAt ?? performance.now()
          say(`app started ${formatDuration(started - t.spawnedAt)} after QEMU started${t.initAt !== undefined ? ` (init at ${formatDuration(t.initAt - t.spawnedAt)})` : ''}`)
        }
        if (httpCheck !== undefined) {
          const hostPort = booted.forwards.find((f) => f.guestPort === httpCheck.port)?.hostPort ?? 0
          const answer = await httpGetWithRetry(hostPort, httpCheck.path, 60_000)
          say(`GET ${httpCheck.path} on guest port ${httpCheck.port} answered ${answer.status}:`)
          process.stdout.write(answer.body.endsWith('\n') ? answer.body : answer.body + '\n')
          await booted.shutdown()
        } else if (timeoutS !== undefined) {
          const timer = setTimeout(() => { say(`stopping after ${timeoutS}s`); void booted.shutdown() }, timeoutS * 1000)
          void booted.exited.finally(() => clearTimeout(timer))
        }
      } catch (err) {
        failed = true
        await booted.destroy()
        say(`${(err as Error).message}`)
      } finally {
        process.off('SIGINT', onSignal)
        process.off('SIGTERM', onSignal)
      }
      const exit = await booted.exited
      say(`${exit.reason}: ${exit.detail}`)
      // Stopped by --http or --timeout, or ended on its own: either is a guest that ran its app.
      return failed || (exit.reason !== 'app-exited' && exit.reason !== 'stopped' && manifest.init !== null) ? 1 : 0
    }
  }
]

function requireOne (positionals: string[], usage: string): string {
  if (positionals.length !== 1 || positionals[0] === undefined) throw new UigniterError('UIG_ERR_CLI_USAGE', `usage: ${usage}`)
  return positionals[0]
}

function parseHttpFlag (text: string | undefined): { port: number, path: string } | undefined {
  if (text === undefined) return undefined
  const m = /^(\d+)(\/.*)?$/.exec(text)
  if (m === null) throw new UigniterError('UIG_ERR_CLI_USAGE', `--http takes PORT or PORT/PATH, not "${text}"`)
  return { port: parseIntFlag(m[1] ?? '', '--http', 1, 65535), path: m[2] ?? '/' }
}
