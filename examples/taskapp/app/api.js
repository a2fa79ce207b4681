// taskapp api: takes tasks, keeps them in the kv service, and has the worker
// service run them. It reaches both through the uigniter gateway, by name.
//
//   POST /tasks        {type, input, rounds?} → 202 and the task (status queued);
//                      ?wait=1: 200 and the finished task, once the worker is done
//   GET  /tasks/:id    the task as it is now, or 404
//   GET  /healthz      200 while the process serves (kv down does not make it unhealthy:
//                      replacing the api would not bring kv back)

import { randomUUID } from 'node:crypto'
import { createServer } from 'node:http'
import { hostname } from 'node:os'
import { HttpError, postJson, readJson, sendError, sendJson, serve, serviceUrl } from './http-json.js'
import { TASK_TTL_S, intEnv, kvFromEnv } from './service-env.js'
import { checkTask } from './task-types.js'

const log = (msg) => console.log(`api: ${msg}`)
const kv = kvFromEnv()
const WORKER_TIMEOUT_MS = intEnv('WORKER_TIMEOUT_MS', 60_000)
const workerUrl = serviceUrl(process.env.WORKER_SERVICE ?? 'worker', '/run')

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/
const taskKey = (id) => `task:${id}`

async function createTask (req, res, wait) {
  const checked = checkTask(await readJson(req))
  if (checked.error !== undefined) throw new HttpError(400, 'BAD_TASK', checked.error)
  const task = { id: randomUUID(), ...checked.fields, status: 'queued', createdAt: new Date().toISOString(), api: hostname() }
  await kv.setJson(taskKey(task.id), task, { exptime: TASK_TTL_S })
  if (!wait) {
    sendJson(res, 202, task)
    dispatch(task).catch((err) => log(`task ${task.id}: ${err.message}`))
    return
  }
  const done = await dispatch(task)
  if (done.status === 'failed' && done.error?.code === 'WORKER_UNAVAILABLE') {
    throw new HttpError(done.error.status, done.error.code, done.error.message, { task: done })
  }
  sendJson(res, 200, done)
}

/**
 * Has the worker service run the task; resolves to the task as it ends. When
 * the worker cannot be reached the task is marked failed in kv here, since
 * the worker never saw it.
 */
async function dispatch (task) {
  let answer
  try {
    answer = await postJson(workerUrl, task, { timeoutMs: WORKER_TIMEOUT_MS })
  } catch (err) {
    answer = { status: err.status ?? 502, body: { code: err.code, message: err.message } }
  }
  if (answer.status === 200) return answer.body
  // 502/503/504 from the gateway (no replica, woke too slowly, replica gone)
  // or the worker's own refusal (its kv write failed).
  const error = {
    code: 'WORKER_UNAVAILABLE',
    status: answer.status >= 500 ? answer.status : 502,
    message: `the worker service answered ${answer.status}: ${answer.body?.code ?? ''} ${answer.body?.message ?? ''}`.trim()
  }
  const failed = { ...task, status: 'failed', error, finishedAt: new Date().toISOString() }
  await kv.setJson(taskKey(task.id), failed, { exptime: TASK_TTL_S })
    .catch((err) => log(`task ${task.id}: could not record the failure: ${err.message}`))
  return failed
}

async function getTask (res, id) {
  if (!UUID.test(id)) throw new HttpError(404, 'TASK_NOT_FOUND', `no task ${id}`)
  const task = await kv.getJson(taskKey(id))
  if (task === null) throw new HttpError(404, 'TASK_NOT_FOUND', `no task ${id}`)
  sendJson(res, 200, task)
}

const server = createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://api')
  const route = async () => {
    if (url.pathname === '/healthz') {
      if (req.method !== 'GET' && req.method !== 'HEAD') throw new HttpError(405, 'METHOD_NOT_ALLOWED', 'GET /healthz')
      return sendJson(res, 200, { ok: true, host: hostname() })
    }
    if (url.pathname === '/tasks') {
      if (req.method !== 'POST') throw new HttpError(405, 'METHOD_NOT_ALLOWED', 'POST /tasks')
      const wait = ['1', 'true'].includes(url.searchParams.get('wait') ?? '')
      return await createTask(req, res, wait)
    }
    const m = /^\/tasks\/([^/]+)$/.exec(url.pathname)
    if (m !== null) {
      if (req.method !== 'GET') throw new HttpError(405, 'METHOD_NOT_ALLOWED', 'GET /tasks/:id')
      return await getTask(res, decodeURIComponent(m[1]))
    }
    throw new HttpError(404, 'NOT_FOUND', `no route ${req.method} ${url.pathname}`)
  }
  route().catch((err) => {
    if (res.headersSent) return log(`${req.method} ${url.pathname}: ${err.message}`)
    sendError(res, err, log)
  })
})

log(`kv at ${kv.address}, worker at ${workerUrl}`)
serve(server, 'api', () => kv.close())
