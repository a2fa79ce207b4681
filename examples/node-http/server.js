// node-http: a Node.js HTTP server as a single-app microVM.
import { openSync, readSync } from 'node:fs'
import { createServer } from 'node:http'
import { hostname, networkInterfaces } from 'node:os'

const port = Number(process.env.PORT ?? 8080)

// Random bytes straight from the kernel, read per request. A clone of a
// template taken with this app running shares the app's memory, OpenSSL's
// generator (crypto.randomBytes) included, but takes a fresh kernel seed.
const urandom = openSync('/dev/urandom', 'r')
function kernelRandom (n) {
  const bytes = Buffer.alloc(n)
  readSync(urandom, bytes, 0, n, null)
  return bytes.toString('hex')
}

// Who this instance is now: read per request, since a clone changes its address after start.
function identity () {
  const eth0 = (networkInterfaces().eth0 ?? []).find((a) => a.family === 'IPv4')
  return { host: hostname(), ip: eth0?.address ?? null, mac: eth0?.mac ?? null }
}

const server = createServer((req, res) => {
  const body = JSON.stringify({ hello: 'from uigniter', ...identity(), path: req.url, random: kernelRandom(16) })
  res.writeHead(200, { 'content-type': 'application/json' })
  res.end(body + '\n')
})
server.listen(port, () => console.log(`node-http: listening on :${port}`))
process.on('SIGTERM', () => server.close(() => console.log('node-http: stopped')))
