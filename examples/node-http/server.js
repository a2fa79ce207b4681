// node-http: a Node.js HTTP server as a single-app microVM.
import { createServer } from 'node:http'
import { hostname } from 'node:os'
import { randomBytes } from 'node:crypto'

const port = Number(process.env.PORT ?? 8080)
const server = createServer((req, res) => {
  const body = JSON.stringify({ hello: 'from uigniter', host: hostname(), path: req.url, random: randomBytes(8).toString('hex') })
  res.writeHead(200, { 'content-type': 'application/json' })
  res.end(body + '\n')
})
server.listen(port, () => console.log(`node-http: listening on :${port}`))
process.on('SIGTERM', () => server.close(() => console.log('node-http: stopped')))
