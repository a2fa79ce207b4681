/** One server-sent event: its type (the `event:` field, `message` without one) and its data (the `data:` lines, joined by newlines). */
export interface ServerSentEvent {
  type: string
  data: string
}

/**
 * A parser of the text/event-stream format, fed chunks as they come (an event
 * may span chunks): calls `onEvent` at each blank line that ends an event
 * with data. Comments (`:` lines, the daemon's keep-alives) and the `id` and
 * `retry` fields are skipped.
 */
export function eventStreamParser (onEvent: (event: ServerSentEvent) => void): (chunk: string) => void {
  let pending = ''
  let type = ''
  let data: string[] = []
  return (chunk) => {
    pending += chunk
    // Lines end in \n or \r\n (a lone \r, which the format also allows, is not something the daemon
    // sends); the last piece has no line end yet: it waits for the next chunk.
    const lines = pending.split('\n')
    pending = lines.pop() ?? ''
    for (const raw of lines) {
      const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw
      if (line === '') {
        if (data.length > 0) onEvent({ type: type === '' ? 'message' : type, data: data.join('\n') })
        type = ''
        data = []
        continue
      }
      if (line.startsWith(':')) continue
      const colon = line.indexOf(':')
      const field = colon < 0 ? line : line.slice(0, colon)
      let value = colon < 0 ? '' : line.slice(colon + 1)
      if (value.startsWith(' ')) value = value.slice(1)
      if (field === 'event') type = value
      else if (field === 'data') data.push(value)
    }
  }
}
