import { constants as fsConstants } from 'node:fs'
import { open } from 'node:fs/promises'
import { constants as osConstants } from 'node:os'
import { posix } from 'node:path'
import { Type, type Static } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import { describeSchemaErrors } from '../core/config.js'
import { UigniterError, hasErrno } from '../core/errors.js'
import { resolveInRoot } from './layer-path.js'

const Strings = Type.Union([Type.Array(Type.String()), Type.Null()])

/**
 * The parts of an OCI image config (and of Docker's, which has the same
 * shape) that uigniter uses; other fields (Volumes, Healthcheck, history…)
 * are allowed and ignored.
 */
export const OciImageConfigSchema = Type.Object({
  architecture: Type.Optional(Type.String()),
  os: Type.Optional(Type.String()),
  config: Type.Optional(Type.Union([Type.Null(), Type.Object({
    User: Type.Optional(Type.String()),
    ExposedPorts: Type.Optional(Type.Union([Type.Record(Type.String(), Type.Unknown()), Type.Null()])),
    Env: Type.Optional(Strings),
    Entrypoint: Type.Optional(Strings),
    Cmd: Type.Optional(Strings),
    WorkingDir: Type.Optional(Type.String()),
    Labels: Type.Optional(Type.Union([Type.Record(Type.String(), Type.String()), Type.Null()])),
    StopSignal: Type.Optional(Type.String())
  })]))
})
export type OciImageConfig = Static<typeof OciImageConfigSchema>

export interface ImagePort { port: number; protocol: 'tcp' | 'udp' }

/** What an image config means for running its app, in the terms of uigniter's image builder. */
export interface ImageRunConfig {
  /** argv; argv[0] is an absolute path in the image (looked up in the image's PATH when the config gives a bare name). */
  entrypoint: string[]
  env: Record<string, string>
  workingDir: string
  user: { uid: number; gid: number }
  ports: ImagePort[]
  /** A signal name (SIGTERM when the image names none). */
  stopSignal: string
  labels: Record<string, string>
}

const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/
const MAX_ID = 4_294_967_294
/** /etc/passwd and /etc/group of an untrusted image are read whole: cap them. */
const MAX_ACCOUNT_FILE_BYTES = 4 * 1024 * 1024

function invalid (message: string): UigniterError {
  return new UigniterError('UIG_ERR_OCI_CONFIG_INVALID', `image config: ${message}`)
}

/**
 * Maps an OCI image config onto what uigniter runs: Entrypoint + Cmd as the
 * argv (Cmd alone when there is no Entrypoint), Env, WorkingDir, User
 * resolved to uid and gid from the image's own /etc/passwd and /etc/group in
 * `root` (the applied layers), ExposedPorts, StopSignal and Labels. The
 * config comes from a registry, so it is validated as untrusted input; files
 * of the tree are read with symlinks resolved inside `root`, never on the host.
 *
 * @example
 * const run = await mapImageConfig(JSON.parse(configBlob), '/tmp/rootfs')
 * // { entrypoint: ['/usr/bin/python3', '-m', 'http.server'], user: { uid: 1000, gid: 1000 }, ports: [{ port: 8000, protocol: 'tcp' }], ... }
 */
export async function mapImageConfig (config: unknown, root: string): Promise<ImageRunConfig> {
  if (!Value.Check(OciImageConfigSchema, config)) throw invalid(describeSchemaErrors(OciImageConfigSchema, config))
  if (config.architecture !== undefined && config.architecture !== 'amd64') throw invalid(`the image is for ${config.architecture}; uigniter runs amd64 images`)
  if (config.os !== undefined && config.os !== 'linux') throw invalid(`the image is for ${config.os}; uigniter runs linux images`)
  const c = config.config ?? {}
  const env = parseEnv(c.Env ?? [])
  const workingDir = parseWorkingDir(c.WorkingDir ?? '')
  const argv = [...(c.Entrypoint ?? []), ...(c.Cmd ?? [])]
  const entrypoint = await resolveArgv(argv, root, env.PATH ?? DEFAULT_PATH, workingDir)
  return {
    entrypoint,
    env,
    workingDir,
    user: await resolveUser(c.User ?? '', root),
    ports: parsePorts(c.ExposedPorts ?? {}),
    stopSignal: parseStopSignal(c.StopSignal ?? ''),
    labels: { ...(c.Labels ?? {}) }
  }
}

export function parseEnv (entries: string[]): Record<string, string> {
  const env: Record<string, string> = {}
  for (const entry of entries) {
    const eq = entry.indexOf('=')
    const name = eq === -1 ? entry : entry.slice(0, eq)
    if (!ENV_NAME.test(name)) throw invalid(`Env entry "${entry}" is not NAME=value with NAME of letters, digits and _`)
    if (eq === -1) throw invalid(`Env entry "${entry}" has no "="`)
    const value = entry.slice(eq + 1)
    if (value.includes('\0')) throw invalid(`Env ${name} holds a NUL byte`)
    env[name] = value
  }
  return env
}

function parseWorkingDir (dir: string): string {
  if (dir === '') return '/'
  if (!dir.startsWith('/') || dir.includes('\0')) throw invalid(`WorkingDir "${dir}" is not an absolute path`)
  return posix.normalize(dir)
}

async function resolveArgv (argv: string[], root: string, path: string, workingDir: string): Promise<string[]> {
  const [program, ...args] = argv
  if (program === undefined || program === '') {
    throw new UigniterError('UIG_ERR_IMAGE_NO_ENTRYPOINT', 'the image config has neither Entrypoint nor Cmd; name the program to run')
  }
  if (argv.some((a) => a.includes('\0'))) throw invalid('Entrypoint or Cmd holds a NUL byte')
  const candidates = program.includes('/')
    ? [posix.resolve(workingDir, program)]
    : path.split(':').filter((dir) => dir.startsWith('/')).map((dir) => posix.join(dir, program))
  for (const candidate of candidates) {
    if (await isExecutableInTree(root, candidate)) return [candidate, ...args]
  }
  throw new UigniterError('UIG_ERR_IMAGE_NO_ENTRYPOINT', program.includes('/')
    ? `the image's entrypoint ${candidates[0] ?? program} is not an executable file in the image`
    : `the image's entrypoint "${program}" is in no directory of its PATH (${path})`)
}

async function isExecutableInTree (root: string, guestPath: string): Promise<boolean> {
  const host = await resolveInRoot(root, guestPath)
  if (host === null) return false
  const fh = await openNoFollow(host)
  if (fh === null) return false
  try {
    const st = await fh.stat()
    return st.isFile() && (st.mode & 0o111) !== 0
  } finally {
    await fh.close()
  }
}

async function openNoFollow (hostPath: string): Promise<Awaited<ReturnType<typeof open>> | null> {
  try {
    return await open(hostPath, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW)
  } catch (err) {
    if (hasErrno(err, 'ENOENT', 'ENOTDIR', 'ELOOP', 'EACCES')) return null
    throw err
  }
}

async function readTreeFile (root: string, guestPath: string): Promise<string | null> {
  const host = await resolveInRoot(root, guestPath)
  if (host === null) return null
  const fh = await openNoFollow(host)
  if (fh === null) return null
  try {
    const st = await fh.stat()
    if (!st.isFile()) return null
    if (st.size > MAX_ACCOUNT_FILE_BYTES) throw invalid(`the image's ${guestPath} has ${st.size} bytes, more than an account file should`)
    return await fh.readFile('utf8')
  } finally {
    await fh.close()
  }
}

/** Colon-separated records of /etc/passwd or /etc/group, comments and blank lines left out. */
function records (text: string | null): string[][] {
  if (text === null) return []
  return text.split('\n').filter((l) => l.trim() !== '' && !l.startsWith('#')).map((l) => l.split(':'))
}

function parseId (text: string): number | null {
  if (!/^\d{1,10}$/.test(text)) return null
  const id = Number(text)
  return id <= MAX_ID ? id : null
}

/**
 * User is "", "user", "uid", "user:group" or "uid:gid" (either half a name
 * or a number). A numeric uid that has no passwd entry runs with gid 0, as
 * Docker does; a name that has none is refused.
 */
export async function resolveUser (user: string, root: string): Promise<{ uid: number; gid: number }> {
  if (user === '') return { uid: 0, gid: 0 }
  if (user.includes('\0') || user.split(':').length > 2) throw invalid(`User "${user}" is not user[:group]`)
  const [userPart = '', groupPart] = user.split(':')
  if (userPart === '') throw invalid(`User "${user}" names no user`)
  const passwd = records(await readTreeFile(root, '/etc/passwd'))
  let uid = parseId(userPart)
  let primaryGid: number | null = null
  if (uid === null) {
    if (/^\d+$/.test(userPart)) throw invalid(`User "${user}": uid ${userPart} is out of range`)
    const entry = passwd.find((r) => r[0] === userPart)
    if (entry === undefined) throw invalid(`User "${user}": no user "${userPart}" in the image's /etc/passwd`)
    uid = parseId(entry[2] ?? '')
    primaryGid = parseId(entry[3] ?? '')
    if (uid === null || primaryGid === null) throw invalid(`User "${user}": the image's /etc/passwd entry for "${userPart}" has no valid uid and gid`)
  } else {
    const entry = passwd.find((r) => parseId(r[2] ?? '') === uid)
    primaryGid = entry === undefined ? 0 : parseId(entry[3] ?? '') ?? 0
  }
  if (groupPart === undefined) return { uid, gid: primaryGid }
  if (groupPart === '') throw invalid(`User "${user}" has an empty group`)
  const gid = parseId(groupPart)
  if (gid !== null) return { uid, gid }
  if (/^\d+$/.test(groupPart)) throw invalid(`User "${user}": gid ${groupPart} is out of range`)
  const group = records(await readTreeFile(root, '/etc/group')).find((r) => r[0] === groupPart)
  const named = group === undefined ? null : parseId(group[2] ?? '')
  if (named === null) throw invalid(`User "${user}": no group "${groupPart}" in the image's /etc/group`)
  return { uid, gid: named }
}

export function parsePorts (exposed: Record<string, unknown>): ImagePort[] {
  const ports = new Map<string, ImagePort>()
  for (const key of Object.keys(exposed)) {
    const match = /^(\d{1,5})(?:\/(tcp|udp))?$/i.exec(key)
    const port = match === null ? NaN : Number(match[1])
    if (match === null || port < 1 || port > 65535) throw invalid(`ExposedPorts "${key}" is not PORT[/tcp|/udp] with a port of 1-65535`)
    const protocol = (match[2]?.toLowerCase() ?? 'tcp') as 'tcp' | 'udp'
    ports.set(`${port}/${protocol}`, { port, protocol })
  }
  return [...ports.values()].sort((a, b) => a.port - b.port || a.protocol.localeCompare(b.protocol))
}

/** "SIGTERM", "TERM" or "15" (any case) as the signal's name; SIGTERM when empty. */
export function parseStopSignal (signal: string): string {
  if (signal === '') return 'SIGTERM'
  const signals = osConstants.signals as Record<string, number>
  if (/^\d+$/.test(signal)) {
    const name = Object.keys(signals).find((n) => signals[n] === Number(signal))
    if (name === undefined) throw invalid(`StopSignal ${signal} is not a signal number`)
    return name
  }
  const upper = signal.toUpperCase()
  const name = upper.startsWith('SIG') ? upper : `SIG${upper}`
  if (signals[name] === undefined) throw invalid(`StopSignal "${signal}" is not a signal name`)
  return name
}
