import { connect } from 'node:net'

/**
 * Connects to 127.0.0.1:PORT and resolves with everything the server sends
 * before it closes, retrying (every `retryMs`) until it answers or the deadline passes.
 */
export async function tcpRead (port: number, timeoutMs: number, retryMs = 50): Promise<string> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    try {
      return await new Promise((resolve, reject) => {
        const s = connect(port, '127.0.0.1')
        let text = ''
        s.setTimeout(3000, () => s.destroy(new Error('timeout')))
        s.on('data', (c: Buffer) => { text += c.toString() })
        s.on('end', () => (text === '' ? reject(new Error('empty')) : resolve(text)))
        s.on('error', reject)
      })
    } catch (err) {
      if (Date.now() > deadline) throw err
      await new Promise((resolve) => setTimeout(resolve, retryMs))
    }
  }
}
