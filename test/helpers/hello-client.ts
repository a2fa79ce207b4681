import { request } from 'node:http'

/** GET / on ADDRESS:8080 (the hello example on a bridge address) until it answers; resolves with the body. */
export async function helloAt (address: string, timeoutMs = 60_000): Promise<string> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const body = await new Promise<string | undefined>((resolve) => {
      const req = request({ host: address, port: 8080, path: '/', timeout: 1000 }, (res) => {
        let text = ''
        res.setEncoding('utf8')
        res.on('data', (c: string) => { text += c })
        res.on('end', () => resolve(text))
      })
      req.on('error', () => resolve(undefined))
      req.on('timeout', () => { req.destroy(); resolve(undefined) })
      req.end()
    })
    if (body !== undefined) return body
    if (Date.now() > deadline) throw new Error(`${address}:8080 did not answer within ${timeoutMs} ms`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}
