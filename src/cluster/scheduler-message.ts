import type { NodeRejection } from '../core/cluster.js'

/** How many filtered nodes a message names before it says "and N more". */
export const MESSAGE_MAX_FILTERED = 5

/**
 * A decision as one line for the events:
 * `placed api-3 on node-b (score 87: spread 30, free 25, template 17); node-a filtered: memory 1,900 MiB free < 2,048 MiB asked`
 * or, when nothing fits, `api-3 fits no node: node-a: cordoned (...), node-b: ...`.
 * Parts above zero, highest first; the first five filtered nodes, then `and N more`.
 */
export function decisionMessage (replica: string, placed: { node: string, score: number, parts: Record<string, number> } | undefined, filtered: readonly NodeRejection[]): string {
  if (placed === undefined) {
    if (filtered.length === 0) return `${replica} fits no node: the cluster has no nodes`
    return `${replica} fits no node: ${rejections(filtered, r => `${r.node}: ${r.reason}`, 'more')}`
  }
  const shown = Object.entries(placed.parts).filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1])
  const score = shown.length === 0 ? `score ${placed.score}` : `score ${placed.score}: ${shown.map(([k, v]) => `${k} ${v}`).join(', ')}`
  const head = `placed ${replica} on ${placed.node} (${score})`
  if (filtered.length === 0) return head
  return `${head}; ${rejections(filtered, r => `${r.node} filtered: ${r.reason}`, 'more filtered')}`
}

function rejections (filtered: readonly NodeRejection[], show: (r: NodeRejection) => string, more: string): string {
  const n = Math.min(filtered.length, MESSAGE_MAX_FILTERED)
  let text = ''
  for (let i = 0; i < n; i++) text += (i > 0 ? ', ' : '') + show(filtered[i] as NodeRejection)
  const rest = filtered.length - n
  return rest > 0 ? `${text}, and ${groupDigits(rest)} ${more}` : text
}

/** 1900 → "1,900", 1234.5 → "1,234.5" (at most two decimals). Plain code: Intl is slow in a hot path. */
export function groupDigits (n: number): string {
  const negative = n < 0
  const rounded = Math.round(Math.abs(n) * 100) / 100
  const whole = Math.trunc(rounded)
  const fraction = rounded - whole
  let digits = String(whole)
  let grouped = ''
  while (digits.length > 3) {
    grouped = ',' + digits.slice(-3) + grouped
    digits = digits.slice(0, -3)
  }
  grouped = digits + grouped
  if (fraction > 0) grouped += fraction.toFixed(2).slice(1).replace(/0$/, '')
  return negative ? '-' + grouped : grouped
}
