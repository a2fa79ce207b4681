import { waitForAppAnswer } from '../../src/core/app-probe.js'

/**
 * Connects to 127.0.0.1:PORT and resolves with everything the server sends
 * before it closes (it speaks first), retrying (every `retryMs`) until it
 * answers or the deadline passes.
 */
export async function tcpRead (port: number, timeoutMs: number, retryMs = 50): Promise<string> {
  const answer = await waitForAppAnswer({ host: '127.0.0.1', port, speaksFirst: true }, timeoutMs, undefined,
    { intervalMs: retryMs, attempt: { connectMs: 3000, answerMs: 3000 } })
  return answer.body
}
