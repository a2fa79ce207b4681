import { UigniterError } from '../core/errors.js'
import { helpText, parseCommandArgs, type Command } from './args.js'
import { imageCommands } from './image-commands.js'
import { kernelCommands } from './kernel-commands.js'
import { nodeCommands } from './node-commands.js'
import { poolCommands } from './pool-commands.js'
import { serviceCommands } from './service-commands.js'
import { templateCommands } from './template-commands.js'
import { vmCommands } from './vm-commands.js'
import { volumeCommands } from './volume-commands.js'

const cliCommands: Command[] = [...vmCommands, ...imageCommands, ...poolCommands, ...templateCommands, ...volumeCommands, ...serviceCommands, ...nodeCommands, ...kernelCommands]
/** The CLI's commands plus the executable's (runCli). */
let commands: Command[] = cliCommands

function usage (): string {
  const width = Math.max(...commands.map((c) => c.name.length))
  return [
    'usage: uigniter COMMAND [options]',
    '',
    'Run each service of an application as a single-purpose microVM.',
    '',
    'Commands:',
    ...commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    '',
    'Run "uigniter COMMAND --help" for a command\'s options.'
  ].join('\n')
}

/** Finds the longest command name that the argv starts with ("image build" before "image"). */
function findCommand (argv: string[]): { command: Command, rest: string[] } | undefined {
  for (const words of [2, 1]) {
    const name = argv.slice(0, words).join(' ')
    const command = commands.find((c) => c.name === name)
    if (command !== undefined) return { command, rest: argv.slice(words) }
  }
  return undefined
}

async function main (argv: string[]): Promise<number> {
  if (argv.length === 0 || argv[0] === '--help' || argv[0] === '-h' || argv[0] === 'help') {
    console.log(usage())
    return argv.length === 0 ? 2 : 0
  }
  const found = findCommand(argv)
  if (found === undefined) {
    const group = commands.filter((c) => c.name.startsWith(`${argv[0] ?? ''} `))
    if (group.length > 0 && (argv[1] === undefined || argv[1] === '--help' || argv[1] === '-h')) {
      console.log(group.map((c) => `${c.usage}\n    ${c.summary}`).join('\n'))
      return argv[1] === undefined ? 2 : 0
    }
    console.error(`uigniter: unknown command "${argv.slice(0, 2).join(' ')}"\n\n${usage()}`)
    return 2
  }
  const { values, positionals } = parseCommandArgs(found.command, found.rest)
  if (values.help === true) {
    console.log(helpText(found.command))
    return 0
  }
  return await found.command.run(values, positionals)
}

/**
 * Runs one command line and sets the exit code. `extra` adds commands that
 * are not the CLI's own (the executable adds `daemon`, src/daemon/main.ts).
 */
export function runCli (argv: string[], extra: Command[] = []): void {
  commands = [...cliCommands, ...extra]
  main(argv).then((code) => { process.exitCode = code }, (err: unknown) => {
    if (err instanceof UigniterError) {
      console.error(`error ${err.code}: ${err.message}`)
      process.exitCode = err.code === 'UIG_ERR_CLI_USAGE' ? 2 : 1
    } else {
      console.error(`uigniter: unexpected error: ${err instanceof Error ? err.stack ?? err.message : String(err)}`)
      process.exitCode = 1
    }
  })
}
