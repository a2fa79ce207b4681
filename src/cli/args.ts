import { parseArgs, type ParseArgsConfig } from 'node:util'
import { UigniterError } from '../core/errors.js'

export type Options = NonNullable<ParseArgsConfig['options']>

/** A CLI command: its help text and what it does. Commands print; nothing else does. */
export interface Command {
  name: string
  summary: string
  usage: string
  options: Options
  /** Lines of help under the usage line, one per flag or note. */
  help: string[]
  run: (values: Record<string, unknown>, positionals: string[]) => Promise<number>
  /** Everything from the first positional on is positional (`run IMAGE -vv`: -vv is the app's). */
  positionalTail?: boolean
}

/** Parses argv for one command; unknown or malformed flags are UIG_ERR_CLI_USAGE. */
export function parseCommandArgs (command: Command, argv: string[]): { values: Record<string, unknown>, positionals: string[] } {
  const options: Options = { ...command.options, help: { type: 'boolean', short: 'h' } }
  let tail: string[] = []
  if (command.positionalTail === true) {
    const at = firstPositional(argv, options)
    tail = argv.slice(at)
    argv = argv.slice(0, at)
  }
  try {
    const { values, positionals } = parseArgs({ args: argv, options, allowPositionals: true, strict: true })
    return { values, positionals: [...positionals, ...tail] }
  } catch (err) {
    throw new UigniterError('UIG_ERR_CLI_USAGE', `${(err as Error).message}\nusage: ${command.usage}`)
  }
}

/** Index of the first token that is not an option or an option's value. */
function firstPositional (argv: string[], options: Options): number {
  for (let i = 0; i < argv.length; i++) {
    const token = argv[i] ?? ''
    if (token === '--') return i + 1
    if (!token.startsWith('-') || token === '-') return i
    if (token.includes('=')) continue
    const option = token.startsWith('--')
      ? options[token.slice(2)]
      : Object.values(options).find((o) => o.short === token.slice(1))
    if (option?.type === 'string') i++
  }
  return argv.length
}

export function helpText (command: Command): string {
  return [`usage: ${command.usage}`, '', command.summary, ...(command.help.length > 0 ? ['', ...command.help.map((l) => `  ${l}`)] : [])].join('\n')
}

/** `--memory 512`, `512M`, `1G` → MiB. */
export function parseMiB (text: string, flag: string): number {
  const m = /^(\d+)\s*([MmGg]i?[Bb]?)?$/.exec(text.trim())
  if (m === null) throw new UigniterError('UIG_ERR_CLI_USAGE', `${flag} must be a size like 256, 256M or 1G (MiB by default), not "${text}"`)
  const n = Number(m[1])
  return m[2] !== undefined && /^g/i.test(m[2]) ? n * 1024 : n
}

export function parseIntFlag (text: string, flag: string, min: number, max: number): number {
  const n = Number(text)
  if (!Number.isInteger(n) || n < min || n > max) throw new UigniterError('UIG_ERR_CLI_USAGE', `${flag} must be an integer from ${min} to ${max}, not "${text}"`)
  return n
}

/** `K=V` pairs from repeated `-e/--env` flags. */
export function parseEnv (list: string[] | undefined): Record<string, string> {
  const env: Record<string, string> = {}
  for (const item of list ?? []) {
    const eq = item.indexOf('=')
    if (eq <= 0) throw new UigniterError('UIG_ERR_CLI_USAGE', `--env takes KEY=VALUE, not "${item}"`)
    env[item.slice(0, eq)] = item.slice(eq + 1)
  }
  return env
}

/** Prints rows as aligned columns for people. */
export function printTable (headers: string[], rows: string[][]): void {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)))
  const fmt = (cells: string[]): string => cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd()
  console.log(fmt(headers))
  for (const row of rows) console.log(fmt(row))
}
