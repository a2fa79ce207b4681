import type { Writable } from 'node:stream'
import tar from 'tar-stream'

/** One tar entry: its header, and its data as a stream (read it to the end, even when unused). */
export interface TarEntry extends AsyncIterable<Buffer> {
  header: tar.Header
}

export interface LayerExtract {
  /** Where the uncompressed tar bytes go. */
  sink: Writable
  entries: AsyncIterable<TarEntry>
  destroy: (err?: unknown) => void
}

/** Raw bytes of the PAX `SCHILY.xattr.NAME` records of an entry, by xattr NAME. */
export type RawXattrs = Map<string, Buffer>

const rawXattrsKey = Symbol('uigniter.rawXattrs')
const XATTR_PREFIX = 'SCHILY.xattr.'

/**
 * A tar-stream extractor that also keeps the PAX xattr values as bytes.
 * tar-stream 3.2.2 decodes every PAX value as UTF-8, which mangles a binary
 * `security.capability` (any byte past 0x7f that is not valid UTF-8 becomes
 * U+FFFD). Its extractor calls `_decodeLongHeader(buf)` with the raw PAX
 * block before it merges the parsed records into the next entry's
 * `header.pax`; we parse the same block again, binary-safe, and hang the
 * result on that object. If a later tar-stream renames the hook, the check
 * below fails loudly instead of dropping capabilities without a word.
 */
export function createLayerExtract (): LayerExtract {
  const extract = tar.extract()
  const hooked = extract as unknown as { _decodeLongHeader?: (buf: Buffer) => void; _pax: Record<string, unknown> | null; _header: { type: string } | null }
  const original = hooked._decodeLongHeader
  if (typeof original !== 'function') throw new Error('tar-stream no longer has _decodeLongHeader: the PAX xattr reader needs updating')
  hooked._decodeLongHeader = function (buf: Buffer): void {
    original.call(this, buf)
    if (hooked._header?.type === 'pax-header' && hooked._pax !== null) {
      Object.defineProperty(hooked._pax, rawXattrsKey, { value: parseRawXattrs(buf), enumerable: false })
    }
  }
  // tar-stream's own types extend streamx's, which ship no types: narrow them to what we use.
  const streamx = extract as unknown as Writable & { destroy: (err?: unknown) => void }
  return {
    sink: streamx,
    entries: extract as unknown as AsyncIterable<TarEntry>,
    destroy: (err?: unknown) => streamx.destroy(err)
  }
}

/** The entry's xattrs as bytes (empty when it has none). */
export function rawXattrsOf (header: tar.Header): RawXattrs {
  const pax = header.pax as (Record<string, string> & { [rawXattrsKey]?: RawXattrs }) | undefined
  return pax?.[rawXattrsKey] ?? new Map<string, Buffer>()
}

/** PAX records are "LEN KEY=VALUE\n" with LEN the record's own length in bytes. */
export function parseRawXattrs (block: Buffer): RawXattrs {
  const out: RawXattrs = new Map()
  let rest = block
  while (rest.length > 0) {
    const space = rest.indexOf(0x20)
    if (space <= 0) break
    const len = Number.parseInt(rest.subarray(0, space).toString('latin1'), 10)
    if (!Number.isSafeInteger(len) || len <= space + 1 || len > rest.length) break
    const record = rest.subarray(space + 1, len - 1)
    const eq = record.indexOf(0x3d)
    if (eq > 0) {
      const key = record.subarray(0, eq).toString('utf8')
      if (key.startsWith(XATTR_PREFIX)) out.set(key.slice(XATTR_PREFIX.length), Buffer.from(record.subarray(eq + 1)))
    }
    rest = rest.subarray(len)
  }
  return out
}
