/**
 * A template's two files served over HTTP from inside a node's namespace,
 * for bench/cluster.ts's copy measurement (run as its own process there):
 *   node template-file-server.js ADDRESS PORT RAM_FILE STATE_FILE
 * GET /raw/ram and /raw/state stream each file as it is (a sparse RAM file's
 * holes go as zeros); GET /sparse streams a GNU tar of both made with -S, so
 * that only the RAM file's data extents travel.
 */
import { spawn } from 'node:child_process'
import { createReadStream } from 'node:fs'
import { stat } from 'node:fs/promises'
import { createServer } from 'node:http'
import { basename, dirname } from 'node:path'

const [address, portText, ramPath, statePath] = process.argv.slice(2)
if (address === undefined || portText === undefined || ramPath === undefined || statePath === undefined) {
  process.stderr.write('usage: template-file-server ADDRESS PORT RAM_FILE STATE_FILE\n')
  process.exit(2)
}
const files: Record<string, string> = { '/raw/ram': ramPath, '/raw/state': statePath }

const server = createServer((req, res) => {
  const path = files[req.url ?? '']
  if (path !== undefined) {
    stat(path).then((s) => {
      res.writeHead(200, { 'content-length': String(s.size), 'content-type': 'application/octet-stream' })
      createReadStream(path).pipe(res)
    }, (err: unknown) => { res.writeHead(500).end(String(err)) })
    return
  }
  if (req.url === '/sparse') {
    res.writeHead(200, { 'content-type': 'application/x-tar' })
    const tar = spawn('tar', ['-cSf', '-', '-C', dirname(ramPath), basename(ramPath), '-C', dirname(statePath), basename(statePath)], { stdio: ['ignore', 'pipe', 'inherit'] })
    tar.stdout.pipe(res)
    return
  }
  if (req.url === '/ready') { res.end('ok'); return }
  res.writeHead(404).end()
})
server.listen(Number(portText), address, () => { process.stdout.write(`serving on ${address}:${portText}\n`) })
process.on('SIGTERM', () => { server.close(); process.exit(0) })
