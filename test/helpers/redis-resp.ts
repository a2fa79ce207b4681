import { connect } from 'node:net'

/**
 * One Redis command over RESP on a fresh connection, and its reply: a
 * string (simple or bulk), a number, null, or an error thrown. Enough for
 * SET/GET/INCR/DBSIZE in tests; Debian's redis-tools is not needed on the
 * host.
 */
export async function redisCommand (host: string, port: number, args: string[], timeoutMs = 5000): Promise<string | number | null> {
  const request = `*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`
  return await new Promise((resolve, reject) => {
    const socket = connect({ host, port })
    let data = Buffer.alloc(0)
    const fail = (err: Error): void => { socket.destroy(); reject(err) }
    socket.setTimeout(timeoutMs, () => fail(new Error(`redis ${args[0] ?? ''} on ${host}:${port}: no reply within ${timeoutMs} ms`)))
    socket.on('error', fail)
    socket.on('close', () => reject(new Error(`redis ${args[0] ?? ''} on ${host}:${port}: closed before a whole reply (${JSON.stringify(data.toString())})`)))
    socket.on('data', (chunk) => {
      data = Buffer.concat([data, chunk])
      const reply = parseReply(data)
      if (reply === undefined) return
      socket.destroy()
      if (reply instanceof Error) reject(reply)
      else resolve(reply)
    })
    socket.write(request)
  })
}

/** A whole reply, or undefined while more bytes are needed. */
function parseReply (data: Buffer): string | number | null | Error | undefined {
  const end = data.indexOf('\r\n')
  if (end < 0) return undefined
  const head = data.subarray(1, end).toString()
  switch (String.fromCharCode(data[0] ?? 0)) {
    case '+': return head
    case '-': return new Error(`redis: ${head}`)
    case ':': return Number(head)
    case '$': {
      const length = Number(head)
      if (length < 0) return null
      if (data.length < end + 2 + length + 2) return undefined
      return data.subarray(end + 2, end + 2 + length).toString()
    }
    default: return new Error(`redis: a reply this helper does not read: ${JSON.stringify(data.subarray(0, 40).toString())}`)
  }
}
