#!/usr/bin/env bash
# The main job for now: build the hello example image and boot it; the app's
# console output and its HTTP answer are printed, then the guest is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
uigniter() { node dist/src/cli/main.js "$@"; }
uigniter image build -f examples/hello/image.json
uigniter image test hello --http 8080
