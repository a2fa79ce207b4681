import type { ConsoleMarker } from '../../core/ports/vmm-driver.js'

/**
 * The guest init's machine-readable console lines (src/guest/init/uigniter-init.c):
 * `UIGNITER:INIT`, `UIGNITER:APP-STARTED pid=N`, `UIGNITER:EXEC-FAILED errno=N error="..."`,
 * `UIGNITER:EXIT code=N | signal=N`, `UIGNITER:PROBE-OK`, `UIGNITER:INIT-FAILED error="..."`.
 */
export type { ConsoleMarker }

const MARKER = /UIGNITER:([A-Z-]+)(.*)$/

/** Parses one console line; undefined for anything the app or the kernel printed. */
export function parseConsoleMarker (line: string): ConsoleMarker | undefined {
  const m = MARKER.exec(line.trimEnd())
  if (m === null) return undefined
  const fields = parseFields(m[2] ?? '')
  switch (m[1]) {
    case 'INIT': return { kind: 'init' }
    case 'APP-STARTED': return { kind: 'app-started', pid: Number(fields.pid) }
    case 'EXEC-FAILED': return { kind: 'exec-failed', errno: Number(fields.errno), error: fields.error ?? '' }
    case 'EXIT': return fields.signal !== undefined ? { kind: 'exit', signal: Number(fields.signal) } : { kind: 'exit', code: Number(fields.code) }
    case 'PROBE-OK': return { kind: 'probe-ok' }
    case 'INIT-FAILED': return { kind: 'init-failed', error: fields.error ?? '' }
    default: return undefined
  }
}

function parseFields (text: string): Record<string, string> {
  const out: Record<string, string> = {}
  for (const m of text.matchAll(/(\w+)=("((?:[^"\\]|\\.)*)"|\S+)/g)) {
    if (m[1] !== undefined) out[m[1]] = m[3] ?? m[2] ?? ''
  }
  return out
}
