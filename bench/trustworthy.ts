/**
 * Issue 10's figures in one run on this machine: what trust costs.
 *   1. node-http clone start-to-serving with and without the after-clone
 *      step (bench/after-clone.ts; target: the step under 5 ms p50);
 *   2. cold boot and clone start-to-serving inside the jail and outside it,
 *      and idle CPU per jailed VM (bench/jail.ts; targets: +5 % on a cold
 *      boot, +10 ms on a clone, idle CPU unchanged).
 * Each part takes its baseline in the same run. Needs root.
 *   node dist/bench/trustworthy.js [--n 8] [--idle-vms 3] [--idle-s 20]
 */
import { parseArgs } from 'node:util'
import { main as afterClone } from './after-clone.js'
import { runJailBench } from './jail.js'

const { values } = parseArgs({ options: { n: { type: 'string', default: '8' }, 'idle-vms': { type: 'string', default: '3' }, 'idle-s': { type: 'string', default: '20' } } })
const n = Number(values.n)
if (!Number.isInteger(n) || n < 1) throw new Error(`--n takes a whole number ≥ 1, not "${values.n}"`)

console.log('# After-clone step (node-http)\n')
await afterClone(['--n', String(n)])
console.log('\n# The jail\n')
process.stdout.write(await runJailBench({ n, idleVms: Number(values['idle-vms']), idleS: Number(values['idle-s']) }))
