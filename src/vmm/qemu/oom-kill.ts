import { constants } from 'node:fs'
import { open } from 'node:fs/promises'
import { hasErrno } from '../../core/errors.js'

/**
 * Finds the kernel's OOM-killer record for `pid` in /dev/kmsg records
 * (`prio,seq,usecs,flags;message`): "Out of memory: Killed process PID (name) ..."
 * or, under a memory cgroup, "Memory cgroup out of memory: Killed process PID ...".
 * Records older than `sinceUs` (the process's start, in µs since boot) belong
 * to an earlier process with the same pid and are ignored.
 */
export function parseOomKill (records: string, pid: number, sinceUs = 0): string | undefined {
  let found: string | undefined
  for (const record of records.split('\n')) {
    const semi = record.indexOf(';')
    if (semi < 0) continue
    const usecs = Number(record.slice(0, semi).split(',')[2] ?? 0)
    const message = record.slice(semi + 1)
    const m = /Killed process (\d+) \(/.exec(message)
    if (m !== null && Number(m[1]) === pid && usecs >= sinceUs) found = message.trim()
  }
  return found
}

/**
 * Reads the kernel log (/dev/kmsg, root only) and returns the OOM-killer
 * record for `pid`, if any. Undefined as well when the log cannot be read:
 * the caller then reports a plain kill.
 */
export async function findOomKill (pid: number, sinceUs = 0): Promise<string | undefined> {
  let fh
  try {
    fh = await open('/dev/kmsg', constants.O_RDONLY | constants.O_NONBLOCK)
  } catch {
    return undefined
  }
  const records: string[] = []
  try {
    const buf = Buffer.alloc(8192)
    for (let i = 0; i < 100_000; i++) {
      try {
        // One record per read(); EAGAIN at the end of the log.
        const { bytesRead } = await fh.read(buf, 0, buf.length, null)
        if (bytesRead === 0) break
        records.push(buf.toString('utf8', 0, bytesRead).replace(/\n$/, ''))
      } catch (err) {
        // EPIPE: the ring buffer overwrote records under us; the next read goes on.
        if (hasErrno(err, 'EPIPE')) continue
        break
      }
    }
  } finally {
    await fh.close()
  }
  // A record's continuation lines (" KEY=value") are not messages; keep the first line.
  return parseOomKill(records.map((r) => r.split('\n')[0] ?? '').join('\n'), pid, sinceUs)
}
