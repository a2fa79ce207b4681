/**
 * Hop-by-hop headers (RFC 9110 §7.6.1, plus the non-standard
 * Proxy-Connection): they describe one connection and are not forwarded.
 * Transfer-Encoding is among them because each side frames the body anew.
 * Expect is answered by the gateway's own server (100 Continue) already.
 */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'proxy-authorization',
  'te', 'trailer', 'transfer-encoding', 'upgrade', 'expect'])

/** Further hop-by-hop names a Connection header lists (`Connection: close, x-foo`), if any. */
function connectionTokens (raw: readonly string[]): Set<string> | undefined {
  let tokens: Set<string> | undefined
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string
    if (name.length !== 10 || name.toLowerCase() !== 'connection') continue
    for (const t of (raw[i + 1] as string).split(',')) {
      const token = t.trim().toLowerCase()
      if (token !== '' && token !== 'close' && token !== 'keep-alive') (tokens ??= new Set()).add(token)
    }
  }
  return tokens
}

/**
 * The headers of an upstream request, as a raw [name, value, ...] list (the
 * fast path of http.request: no per-header validation): the client's, less
 * the hop-by-hop ones, plus X-Forwarded-For (appended to the client's own),
 * Transfer-Encoding: chunked when the client sent a chunked body, and
 * X-Forwarded-Prefix when the request came through a /svc/NAME prefix.
 */
export function upstreamRequestHeaders (raw: readonly string[], clientAddress: string, chunked: boolean,
  prefix: string | undefined, defaultHost: string): string[] {
  const drop = connectionTokens(raw)
  const out: string[] = []
  let forwardedFor: string | undefined
  let host = false
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string
    const lower = name.toLowerCase()
    if (HOP_BY_HOP.has(lower) || drop?.has(lower) === true) continue
    if (lower === 'x-forwarded-for') {
      forwardedFor = forwardedFor === undefined ? raw[i + 1] : `${forwardedFor}, ${raw[i + 1]}`
      continue
    }
    if (lower === 'host') host = true
    out.push(name, raw[i + 1] as string)
  }
  // HTTP/1.0 clients may send no Host; an HTTP/1.1 upstream (Node's among them) rejects a request without one.
  if (!host) out.push('Host', defaultHost)
  out.push('X-Forwarded-For', forwardedFor === undefined ? clientAddress : `${forwardedFor}, ${clientAddress}`)
  if (prefix !== undefined) out.push('X-Forwarded-Prefix', prefix)
  if (chunked) out.push('Transfer-Encoding', 'chunked')
  return out
}

/**
 * The headers of the answer to the client: the upstream's, less the
 * hop-by-hop ones (Node frames the body again: Content-Length when the
 * upstream gave one, else chunked).
 */
export function clientResponseHeaders (raw: readonly string[]): string[] {
  const drop = connectionTokens(raw)
  const out: string[] = []
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string
    const lower = name.toLowerCase()
    if (HOP_BY_HOP.has(lower) || drop?.has(lower) === true) continue
    out.push(name, raw[i + 1] as string)
  }
  return out
}
