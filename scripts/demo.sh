#!/usr/bin/env bash
# The main job: the decomposed application (examples/taskapp) end to end.
# It builds the three images, brings the application up (kv booted cold,
# api and worker as clones of templates made on the way), sends tasks
# through the gateway (the first one wakes the worker from zero), shows how
# each replica started and how long it took, and takes the application down.
set -euo pipefail
cd "$(dirname "$0")/.."
uigniter() { node dist/src/daemon/main.js "$@"; }
APP=examples/taskapp/uigniter.yaml
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building the images: memcached (kv), taskapp-api, taskapp-worker"
uigniter image build -f examples/memcached/image.json
uigniter image build -f examples/taskapp/api.image.json
uigniter image build -f examples/taskapp/worker.image.json

# The demo's own daemon, unless one runs already; it is stopped again at the end.
SOCKET=$(node --input-type=module -e 'const { loadConfig } = await import("./dist/src/core/config.js"); console.log(loadConfig().api.socket)')
STARTED_DAEMON=
if ! curl -sf --unix-socket "$SOCKET" http://daemon/healthz >/dev/null 2>&1; then
  say "starting the daemon (its log: /tmp/uigniter-demo-daemon.log)"
  # node itself, not the uigniter() function: $! must be the daemon, so that the end can stop it.
  node dist/src/daemon/main.js daemon >/tmp/uigniter-demo-daemon.log 2>&1 &
  STARTED_DAEMON=$!
  for _ in $(seq 1 600); do
    curl -sf --unix-socket "$SOCKET" http://daemon/healthz >/dev/null 2>&1 && break
    kill -0 "$STARTED_DAEMON" 2>/dev/null || { cat /tmp/uigniter-demo-daemon.log >&2; exit 1; }
    sleep 0.1
  done
fi

say "uigniter info"
uigniter info
GATEWAY_PORT=$(uigniter info --json | node -e 'let s="";process.stdin.on("data",c=>s+=c).on("end",()=>console.log(JSON.parse(s).gateway.httpPort))')
GW="http://127.0.0.1:${GATEWAY_PORT}"

cleanup() {
  say "uigniter down"
  uigniter down "$APP" || true
  if [ -n "$STARTED_DAEMON" ]; then kill "$STARTED_DAEMON" && wait "$STARTED_DAEMON" || true; fi
}
trap cleanup EXIT

say "uigniter up $APP (waits until every service is ready; the worker stays at zero)"
uigniter up "$APP"

say "a task through the gateway: api → worker (woken from zero) → kv"
curl -sS -w '\n(%{time_total} s, the worker cold from zero)\n' -H 'content-type: application/json' \
  -d '{"type":"sha256","input":"uigniter","rounds":1000}' "$GW/svc/api/tasks?wait=1"

say "20 tasks at once, then each one read back from kv"
node --input-type=module - "$GW" <<'EOF'
const gw = process.argv[2]
const post = async (i) => {
  const res = await fetch(`${gw}/svc/api/tasks?wait=1`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ type: 'reverse', input: `task ${i}` }) })
  return await res.json()
}
const started = performance.now()
const tasks = await Promise.all(Array.from({ length: 20 }, (_, i) => post(i)))
const ms = Math.round(performance.now() - started)
let intact = 0
for (const [i, t] of tasks.entries()) {
  const back = await (await fetch(`${gw}/svc/api/tasks/${t.id}`)).json()
  if (back.input === `task ${i}` && back.result === [...`task ${i}`].reverse().join('')) intact++
}
const ids = new Set(tasks.map((t) => t.id))
console.log(`${tasks.length} tasks in ${ms} ms: ${ids.size} distinct ids, ${intact} read back intact; ` +
  `api replicas ${new Set(tasks.map((t) => t.api)).size}, worker replicas ${new Set(tasks.map((t) => t.worker)).size}`)
if (ids.size !== tasks.length || intact !== tasks.length) { console.error('tasks were lost'); process.exit(1) }
EOF

say "uigniter service ls"
uigniter service ls --app taskapp

say "how each replica started (ms from the start of its create)"
uigniter ps --json | node -e '
let s = ""
process.stdin.on("data", (c) => { s += c }).on("end", () => {
  const rows = JSON.parse(s).filter((vm) => vm.service !== null)
  const ms = (v) => v === undefined ? "-" : String(Math.round(v))
  const table = [["SERVICE", "REPLICA", "START PATH", "SPAWN", "RESTORE", "IDENTITY", "TOTAL"]]
  for (const vm of rows) {
    const t = vm.startTimings ?? {}
    table.push([vm.service.name, vm.name, vm.template !== null ? `clone of ${vm.template}` : vm.startPath, ms(t.spawnMs), ms(t.restoreMs), ms(t.identityMs), ms(t.totalMs)])
  }
  const widths = table[0].map((_, i) => Math.max(...table.map((r) => r[i].length)))
  for (const r of table) console.log(r.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd())
})'
