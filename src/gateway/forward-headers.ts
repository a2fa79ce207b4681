/**
 * Hop-by-hop headers (RFC 9110 §7.6.1, plus the non-standard
 * Proxy-Connection): they describe one connection and are not forwarded.
 * Transfer-Encoding is among them because each side frames the body anew.
 * Expect is answered by the gateway's own server (100 Continue) already.
 */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'proxy-authorization',
  'te', 'trailer', 'transfer-encoding', 'upgrade', 'expect'])

/** Whether a (lower-case) header name is hop-by-hop. */
export function isHopByHop (lowerName: string): boolean {
  return HOP_BY_HOP.has(lowerName)
}

/**
 * Adds to `tokens` the further hop-by-hop names a Connection header value
 * lists (`Connection: close, x-foo` → x-foo); close and keep-alive are not
 * header names.
 */
export function connectionTokens (value: string, tokens: Set<string> | undefined): Set<string> | undefined {
  // Nearly every message says just one of these: no list to split.
  if (value.length <= 10) {
    const v = value.toLowerCase()
    if (v === 'keep-alive' || v === 'close') return tokens
  }
  for (const t of value.split(',')) {
    const token = t.trim().toLowerCase()
    if (token !== '' && token !== 'close' && token !== 'keep-alive') (tokens ??= new Set()).add(token)
  }
  return tokens
}

/** A raw [name, value, ...] list without the headers a Connection header named. */
export function withoutTokens (headers: readonly string[], tokens: ReadonlySet<string>): string[] {
  const out: string[] = []
  for (let i = 0; i < headers.length; i += 2) {
    if (!tokens.has((headers[i] as string).toLowerCase())) out.push(headers[i] as string, headers[i + 1] as string)
  }
  return out
}

/**
 * The head of an upstream request, blank line included: the request line
 * and the client's headers less the hop-by-hop ones (Node's parser has
 * validated them), plus X-Forwarded-For (appended to the client's own),
 * Transfer-Encoding: chunked when the client sent a chunked body (the body
 * is chunked again on the way), and X-Forwarded-Prefix when the request came
 * through a /svc/NAME prefix. HTTP/1.1 keeps the connection alive by default.
 */
export function upstreamRequestHead (method: string, path: string, raw: readonly string[], clientAddress: string, chunked: boolean,
  prefix: string | undefined, defaultHost: string): string {
  const head = buildHead(method, path, raw, clientAddress, chunked, prefix, defaultHost, undefined)
  // Rare: the client named further hop-by-hop headers; build it again without them.
  return typeof head === 'string' ? head : buildHead(method, path, raw, clientAddress, chunked, prefix, defaultHost, head) as string
}

/** The head; or, on a first pass (drop undefined) that met a Connection header naming other headers, those names. */
function buildHead (method: string, path: string, raw: readonly string[], clientAddress: string, chunked: boolean,
  prefix: string | undefined, defaultHost: string, drop: ReadonlySet<string> | undefined): string | Set<string> {
  let tokens: Set<string> | undefined
  let head = `${method} ${path} HTTP/1.1\r\n`
  let forwardedFor: string | undefined
  let host = false
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string
    const value = raw[i + 1] as string
    const lower = name.toLowerCase()
    if (HOP_BY_HOP.has(lower)) {
      if (lower === 'connection' && drop === undefined) tokens = connectionTokens(value, tokens)
      continue
    }
    if (drop?.has(lower) === true) continue
    if (lower === 'x-forwarded-for') {
      forwardedFor = forwardedFor === undefined ? value : `${forwardedFor}, ${value}`
      continue
    }
    if (lower === 'host') host = true
    head += `${name}: ${value}\r\n`
  }
  if (tokens !== undefined) return tokens
  // HTTP/1.0 clients may send no Host; an HTTP/1.1 upstream (Node's among them) rejects a request without one.
  if (!host) head += `Host: ${defaultHost}\r\n`
  head += `X-Forwarded-For: ${forwardedFor === undefined ? clientAddress : `${forwardedFor}, ${clientAddress}`}\r\n`
  if (prefix !== undefined) head += `X-Forwarded-Prefix: ${prefix}\r\n`
  if (chunked) head += 'Transfer-Encoding: chunked\r\n'
  return head + '\r\n'
}
