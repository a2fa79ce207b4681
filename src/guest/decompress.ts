import { spawn } from 'node:child_process'
import { open, writeFile } from 'node:fs/promises'
import { promisify } from 'node:util'
import { gunzip } from 'node:zlib'
import { UigniterError, hasErrno } from '../core/errors.js'

/** The compressions Linux uses for a bzImage payload or for modules. */
export type Compression = 'gzip' | 'xz' | 'lzma' | 'zstd' | 'lz4' | 'bzip2' | 'lzo'

/** Debian's tool for each format (gzip is done in-process by zlib) and the package that ships it. */
const TOOLS: Record<Exclude<Compression, 'gzip'>, { cmd: string, args: string[], pkg: string }> = {
  xz: { cmd: 'xz', args: ['-dc'], pkg: 'xz-utils' },
  lzma: { cmd: 'xz', args: ['--format=lzma', '-dc'], pkg: 'xz-utils' },
  zstd: { cmd: 'zstd', args: ['-dcq'], pkg: 'zstd' },
  lz4: { cmd: 'lz4', args: ['-dc'], pkg: 'lz4' },
  bzip2: { cmd: 'bzip2', args: ['-dc'], pkg: 'bzip2' },
  lzo: { cmd: 'lzop', args: ['-dc'], pkg: 'lzop' }
}

/**
 * Decompresses `input` into the file `outPath`. Formats other than gzip go
 * through Debian's own tools, fed on stdin and writing straight to the file,
 * so a 50 MB kernel is never held twice in memory.
 */
export async function decompressToFile (format: Compression, input: Buffer, outPath: string): Promise<void> {
  if (format === 'gzip') {
    await writeFile(outPath, await promisify(gunzip)(input))
    return
  }
  const tool = TOOLS[format]
  const out = await open(outPath, 'w')
  try {
    await new Promise<void>((resolve, reject) => {
      const child = spawn(tool.cmd, tool.args, { stdio: ['pipe', out.fd, 'pipe'] })
      let stderr = ''
      child.stderr?.on('data', (c: Buffer) => { stderr = (stderr + c.toString()).slice(-2000) })
      // The tool may exit before reading everything (bad data); its exit code says why, not the EPIPE.
      child.stdin?.on('error', () => {})
      child.on('error', (err) => {
        reject(hasErrno(err, 'ENOENT')
          ? new UigniterError('UIG_ERR_HOST_MISSING_TOOL', `"${tool.cmd}" is needed to decompress ${format} data; install it with: apt-get install -y ${tool.pkg}`, { cause: err })
          : err)
      })
      child.on('close', (code) => {
        if (code === 0) resolve()
        else reject(new Error(`${tool.cmd} ${tool.args.join(' ')} exited with ${code}: ${stderr.trim()}`))
      })
      child.stdin?.end(input)
    })
  } finally {
    await out.close()
  }
}
