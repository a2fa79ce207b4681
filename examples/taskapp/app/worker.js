// taskapp worker: runs one task per request and keeps its state in the kv
// service (reached through the uigniter gateway's TCP port for kv).
//
//   POST /run       a task from the api → marks it running, computes, stores
//                   done (with the result) or failed (with the error); 200 and the task
//   GET  /healthz   200 while the process serves

import { createServer } from 'node:http'
import { hostname } from 'node:os'
import { HttpError, readJson, sendError, sendJson, serve } from './http-json.js'
import { TASK_TTL_S, kvFromEnv } from './service-env.js'
import { checkTask, runTask } from './task-types.js'

const log = (msg) => console.log(`worker: ${msg}`)
const kv = kvFromEnv()
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/

async function run (req, res) {
  const body = await readJson(req)
  if (typeof body.id !== 'string' || !UUID.test(body.id)) throw new HttpError(400, 'BAD_TASK', '"id" must be a UUID')
  const { id, createdAt, api, status: _status, ...fields } = body
  const checked = checkTask(fields)
  if (checked.error !== undefined) throw new HttpError(400, 'BAD_TASK', checked.error)
  const key = `task:${id}`
  // Read per request: a clone of a template takes its own hostname after start.
  const base = { id, ...checked.fields, createdAt, api, worker: hostname() }
  await kv.setJson(key, { ...base, status: 'running', startedAt: new Date().toISOString() }, { exptime: TASK_TTL_S })
  const started = performance.now()
  let task
  try {
    task = { ...base, status: 'done', result: runTask(checked.fields) }
  } catch (err) {
    task = { ...base, status: 'failed', error: { code: 'TASK_FAILED', message: err.message } }
  }
  task.finishedAt = new Date().toISOString()
  task.ms = Math.round((performance.now() - started) * 10) / 10
  await kv.setJson(key, task, { exptime: TASK_TTL_S })
  sendJson(res, 200, task)
}

const server = createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://worker')
  const route = async () => {
    if (url.pathname === '/healthz') {
      if (req.method !== 'GET' && req.method !== 'HEAD') throw new HttpError(405, 'METHOD_NOT_ALLOWED', 'GET /healthz')
      return sendJson(res, 200, { ok: true, host: hostname() })
    }
    if (url.pathname === '/run') {
      if (req.method !== 'POST') throw new HttpError(405, 'METHOD_NOT_ALLOWED', 'POST /run')
      return await run(req, res)
    }
    throw new HttpError(404, 'NOT_FOUND', `no route ${req.method} ${url.pathname}`)
  }
  route().catch((err) => {
    if (res.headersSent) return log(`${req.method} ${url.pathname}: ${err.message}`)
    sendError(res, err, log)
  })
})

log(`kv at ${kv.address}`)
serve(server, 'worker', () => kv.close())
