// The kinds of task the application runs: cheap and deterministic, so that a
// result can be checked anywhere. The api validates with `checkTask`, the
// worker computes with `runTask`.

import { createHash } from 'node:crypto'

const MAX_INPUT_CHARS = 16 * 1024
const MAX_ROUNDS = 1_000_000

const TYPES = {
  /** `rounds` times SHA-256, each over the previous digest (the first over the input); hex. */
  sha256: (task) => {
    let digest = createHash('sha256').update(task.input, 'utf8').digest()
    for (let i = 1; i < task.rounds; i++) digest = createHash('sha256').update(digest).digest()
    return digest.toString('hex')
  },
  /** The input backwards, by code point. */
  reverse: (task) => [...task.input].reverse().join(''),
  /** What `wc` would say, with words split on white space. */
  wordcount: (task) => {
    const words = task.input.split(/\s+/).filter((w) => w !== '').length
    const lines = task.input === '' ? 0 : task.input.split('\n').length
    return { words, lines, characters: [...task.input].length }
  }
}

export const TASK_TYPES = Object.keys(TYPES)

/**
 * The task's fields from a request body `{ type, input, rounds? }` (rounds:
 * sha256 only, default 1000), or a message saying what is wrong.
 */
export function checkTask (body) {
  const { type, input, rounds } = body
  if (typeof type !== 'string') return { error: `"type" is required: one of ${TASK_TYPES.join(', ')}` }
  if (!Object.hasOwn(TYPES, type)) return { error: `unknown type ${JSON.stringify(type)}: one of ${TASK_TYPES.join(', ')}` }
  if (typeof input !== 'string') return { error: '"input" must be a string' }
  if (input.length > MAX_INPUT_CHARS) return { error: `"input" is longer than ${MAX_INPUT_CHARS} characters` }
  const extra = Object.keys(body).filter((k) => !['type', 'input', 'rounds'].includes(k))
  if (extra.length > 0) return { error: `unknown field(s): ${extra.join(', ')}` }
  if (type !== 'sha256') {
    if (rounds !== undefined) return { error: '"rounds" applies to sha256 only' }
    return { fields: { type, input } }
  }
  const r = rounds ?? 1000
  if (!Number.isInteger(r) || r < 1 || r > MAX_ROUNDS) return { error: `"rounds" must be a whole number 1..${MAX_ROUNDS}` }
  return { fields: { type, input, rounds: r } }
}

/** The task's result; throws what the computation throws. */
export function runTask (task) {
  const run = TYPES[task.type]
  if (run === undefined) throw new Error(`unknown task type ${task.type}`)
  return run(task)
}
