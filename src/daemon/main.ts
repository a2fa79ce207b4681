#!/usr/bin/env node
// The `uigniter` executable. It lives in daemon/, the composition root, because it is the one
// program that can both be the daemon and be its client: every other command is the CLI's
// (an API client plus the local image builder), which never imports the daemon.
import { runCli } from '../cli/main.js'
import { daemonCommand } from './daemon-command.js'

runCli(process.argv.slice(2), [daemonCommand])
