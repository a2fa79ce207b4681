import { waitForAppAnswer } from '../../src/core/app-probe.js'

/** GET / on ADDRESS:8080 (the hello example on a bridge address) until it answers, with any status; resolves with the body. */
export async function helloAt (address: string, timeoutMs = 60_000): Promise<string> {
  const answer = await waitForAppAnswer({ host: address, port: 8080, httpPath: '/', anyStatus: true }, timeoutMs, undefined,
    { intervalMs: 50, attempt: { connectMs: 1000, answerMs: 1000 } })
  return answer.body
}
