import { createServer } from 'node:net'

/**
 * A TCP port that was free a moment ago on `host` (QEMU's hostfwd and test
 * servers need a number before they listen). Another process may take it
 * first; callers that can bind to port 0 themselves should.
 */
export async function freePort (host = '127.0.0.1'): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, host, () => {
      const address = server.address()
      server.close(() => resolve(typeof address === 'object' && address !== null ? address.port : 0))
    })
  })
}
