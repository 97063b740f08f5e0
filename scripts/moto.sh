#!/usr/bin/env bash
# A throwaway DynamoDB-compatible server for tests: moto's server mode (PyPI `moto[server]`),
# installed on first use into a virtual environment of the repository's own (`.venv-moto`).
#   scripts/moto.sh install                 → creates .venv-moto if missing (idempotent)
#   scripts/moto.sh start DIR [PORT]        → starts moto on 127.0.0.1:PORT (default: a free port),
#                                             waits until it answers, prints its URL; PID in DIR
#   scripts/moto.sh stop DIR                → stops exactly the server it started (the PID in DIR)
# The server runs moto's application one request at a time (scripts/moto_serial.py), as DynamoDB
# evaluates conditional writes atomically and moto's own threaded server does not;
# IDEMGATE_MOTO_PLAIN=1 starts plain `moto_server` instead (to see the difference).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${IDEMGATE_MOTO_VENV:-$root/.venv-moto}"
# Pinned: the tests rely on its ConditionExpression, ReturnValuesOnConditionCheckFailure and
# item-size behaviour (docs in crates/idemgate-store-dynamodb); change it deliberately.
moto_version="${IDEMGATE_MOTO_VERSION:-5.2.5}"
cmd=${1:-}

install() {
  if [ -x "$venv/bin/moto_server" ] && "$venv/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$moto_version')" 2>/dev/null; then
    return 0
  fi
  echo "moto.sh: installing moto[server]==$moto_version into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$moto_version" >&2
}

case "$cmd" in
install)
  install
  ;;
start)
  dir=${2:?usage: moto.sh start DIR [PORT]}
  install
  port=${3:-$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  mkdir -p "$dir"
  if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "moto.sh: port $port is taken" >&2
    exit 1
  fi
  if [ -n "${IDEMGATE_MOTO_PLAIN:-}" ]; then
    nohup "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 &
  else
    nohup "$venv/bin/python" "$root/scripts/moto_serial.py" 127.0.0.1 "$port" >"$dir/moto.log" 2>&1 &
  fi
  echo $! >"$dir/moto.pid"
  for _ in $(seq 1 100); do
    if curl -sf -o /dev/null "http://127.0.0.1:$port/moto-api/"; then
      echo "http://127.0.0.1:$port"
      exit 0
    fi
    kill -0 "$(cat "$dir/moto.pid")" 2>/dev/null || break
    sleep 0.2
  done
  echo "moto.sh: moto_server did not come up on port $port (log: $dir/moto.log)" >&2
  tail -n 20 "$dir/moto.log" >&2 || true
  exit 1
  ;;
stop)
  dir=${2:?usage: moto.sh stop DIR}
  if [ -f "$dir/moto.pid" ]; then
    kill "$(cat "$dir/moto.pid")" 2>/dev/null || true
    rm -f "$dir/moto.pid"
  fi
  ;;
*)
  echo "usage: scripts/moto.sh install | start DIR [PORT] | stop DIR" >&2
  exit 2
  ;;
esac
