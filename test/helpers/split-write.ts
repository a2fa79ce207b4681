import type { Socket } from 'node:net'

/**
 * Writes `bytes` to the socket in pieces cut at the given fractions of its
 * length (0..1), yielding between pieces, so that a parser sees every split:
 * a hostile peer's torn lines.
 */
export async function writeInPieces (socket: Socket, bytes: Buffer, cuts: readonly number[]): Promise<void> {
  const points = [...new Set(cuts.map((c) => Math.floor(c * bytes.length)))].filter((p) => p > 0 && p < bytes.length).sort((a, b) => a - b)
  let at = 0
  for (const p of [...points, bytes.length]) {
    if (socket.destroyed) return
    socket.write(bytes.subarray(at, p))
    at = p
    await new Promise((resolve) => setImmediate(resolve))
  }
}
