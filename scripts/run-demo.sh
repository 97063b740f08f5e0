#!/usr/bin/env bash
# Builds idemgate and the demo upstream, starts the demo API on 127.0.0.1:3000 and idemgate in
# front of it on 127.0.0.1:8080 (admin, metrics and dashboard on 127.0.0.1:9090), with the
# embedded store in ./idemgate-data. Ctrl-C stops both. Extra arguments go to `idemgate serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p idemgate -p idemgate-demo-upstream
target/release/demo-upstream 127.0.0.1:3000 &
upstream=$!
trap 'kill "$upstream" 2>/dev/null || true' EXIT
exec_args=(serve --upstream http://127.0.0.1:3000 --store file:./idemgate-data "$@")
target/release/idemgate "${exec_args[@]}"
