import { spawn } from 'node:child_process'
import { createReadStream } from 'node:fs'
import type { Readable } from 'node:stream'
import { createGunzip } from 'node:zlib'
import { UigniterError, hasErrno } from '../core/errors.js'
import { layerInvalid } from './layer-errors.js'
import { knownLayerCompression } from './media-types.js'

export interface LayerStream {
  /** The uncompressed tar bytes. */
  stream: Readable
  /** Resolves when the decompressor, if it is a process, has exited well; rejects with its error otherwise. */
  done: Promise<void>
  /** Stops reading and ends the decompressor process, if any (idempotent). */
  destroy: () => void
}

/**
 * Opens a layer file as its uncompressed tar stream. zstd is Debian's `zstd
 * -dc` as a child process: Node 20's zlib has no zstd. A decompression
 * failure surfaces as an 'error' on `stream` (or a rejected `done`), as a
 * layer that is not valid.
 */
export function openLayerStream (path: string, mediaType: string): LayerStream {
  // Pull and import refuse other media types already (layerCompression); a layer applied directly is checked here too.
  const compression = knownLayerCompression(mediaType)
  if (compression === undefined) throw layerInvalid(path, `media type "${mediaType}" is not a layer type uigniter reads (tar, tar+gzip, tar+zstd)`)
  if (compression === 'none') {
    const stream = createReadStream(path)
    return { stream, done: Promise.resolve(), destroy: () => stream.destroy() }
  }
  if (compression === 'gzip') {
    const file = createReadStream(path)
    const gunzip = createGunzip()
    file.on('error', (err) => gunzip.destroy(err))
    gunzip.on('error', () => file.destroy())
    file.pipe(gunzip)
    const stream = gunzip
    return { stream, done: Promise.resolve(), destroy: () => { file.destroy(); gunzip.destroy() } }
  }
  const child = spawn('zstd', ['-dc', '-q', '--', path], { stdio: ['ignore', 'pipe', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-2000) })
  let destroyed = false
  const done = new Promise<void>((resolve, reject) => {
    child.on('error', (err) => {
      reject(hasErrno(err, 'ENOENT')
        ? new UigniterError('UIG_ERR_HOST_MISSING_TOOL', '"zstd" is not installed; run "npm run setup" (as root) to install uigniter\'s host packages', { cause: err })
        : err)
    })
    child.on('close', (code, signal) => {
      if (code === 0 || destroyed) resolve()
      else reject(layerInvalid(path, `zstd could not decompress it (${signal ?? `exit ${String(code)}`}): ${stderr.trim()}`))
    })
  })
  // The caller awaits `done` only after reading; until then a rejection must not count as unhandled.
  done.catch(() => {})
  return {
    stream: child.stdout,
    done,
    destroy: () => {
      if (destroyed) return
      destroyed = true
      child.stdout.destroy()
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    }
  }
}
