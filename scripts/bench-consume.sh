#!/usr/bin/env bash
# Throughput of message dedup, in one run, against the same consumer without dedup:
#   - `idemgate consume` (NATS JetStream -> HTTP POST to the demo upstream) with dedup on the
#     embedded store, on Redis and on PostgreSQL, vs `idemgate consume --no-dedup`;
#   - the library (`message-consumer --mode library`, an in-process no-op handler, one message
#     at a time) on memory:// and the embedded store, vs `--mode plain` (no dedup).
# Every variant reads the same N messages from one stream through a durable consumer of its
# own. Usage: scripts/bench-consume.sh [N] (default 20000). Needs nats-server with JetStream
# (IDEMGATE_TEST_NATS_URL, default nats://127.0.0.1:4222), and for the shared stores
# IDEMGATE_TEST_REDIS_URL / IDEMGATE_TEST_POSTGRES_URL (skipped when unset). Builds what it
# runs (debug, or release with PROFILE=release; into CARGO_TARGET_DIR or target/). The bridge's
# clock starts when it is ready (/readyz), so process start-up is not counted. Prints a
# markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
NATS=${IDEMGATE_TEST_NATS_URL:-nats://127.0.0.1:4222}
TARGET=${CARGO_TARGET_DIR:-target}
PROFILE=${PROFILE:-debug}
release=()
[ "$PROFILE" = release ] && release=(--release)
# One package at a time: a target selection (`--bin`) applies to every `-p` given.
cargo build -q "${release[@]}" -p idemgate --bin idemgate
cargo build -q "${release[@]}" -p idemgate-demo-upstream --bins
cargo build -q "${release[@]}" -p message-consumer --bins
BIN=$TARGET/$PROFILE
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

up=$(port)
"$BIN/demo-upstream" "127.0.0.1:$up" 2>/dev/null & pids+=($!)
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$up") 2>/dev/null && break; sleep 0.05; done

stream="BENCH_$$_$(date +%s)"
subject="$stream.in"
"$BIN/message-consumer" publish --nats "$NATS" --subject "$subject" --count "$N" --create-stream "$stream" >/dev/null

rate() { python3 -c "print(f'{$1/$2:.0f}')"; }
results=()

library() { # label, mode, extra args...
  local label=$1 mode=$2; shift 2
  local out
  out=$("$BIN/message-consumer" consume --nats "$NATS" --stream "$stream" --subject "$subject" \
    --durable "lib_${mode}_$RANDOM" --mode "$mode" --exit-after "$N" "$@" | tail -1)
  local secs=${out##*secs=}
  results+=("| library | $label | $N | $secs | $(rate "$N" "$secs") |")
}

acked_now() { # admin port -> the consumer's acked counter (empty until the listener is up)
  { curl -s "http://127.0.0.1:$1/metrics" || true; } | awk '/^idemgate_consume_acked_total /{print $2}'
}

bridge() { # label, args...
  local label=$1; shift
  local admin; admin=$(port)
  "$BIN/idemgate" consume --source "$NATS" --stream "$stream" --subject "$subject" \
    --durable "bridge_$RANDOM$RANDOM" --target "http://127.0.0.1:$up/bench" --concurrency 32 \
    --admin-listen "127.0.0.1:$admin" --namespace "bench-$$" --no-dead-letter "$@" 2>"$work/consume.log" &
  local pid=$!
  pids+=("$pid")
  # The clock starts once the consumer consumes (/readyz 200), not at process start: store
  # connection and broker binding are not throughput. Messages acked before that are left out.
  until curl -sf -o /dev/null "http://127.0.0.1:$admin/readyz"; do
    kill -0 "$pid" 2>/dev/null || { cat "$work/consume.log" >&2; exit 1; }
    sleep 0.01
  done
  local start; start=$(date +%s.%N)
  local first; first=$(acked_now "$admin"); first=${first:-0}
  local deadline=$((SECONDS + 600))
  while :; do
    local acked; acked=$(acked_now "$admin")
    [ "${acked:-0}" -ge "$N" ] && break
    [ "$SECONDS" -lt "$deadline" ] || { echo "bench-consume: $label did not ack $N messages in 600 s" >&2; exit 1; }
    kill -0 "$pid" 2>/dev/null || { cat "$work/consume.log" >&2; exit 1; }
    sleep 0.02
  done
  local end; end=$(date +%s.%N)
  kill -TERM "$pid"; wait "$pid" || true
  local secs; secs=$(python3 -c "print(f'{$end-$start:.3f}')")
  local counted=$((N - first))
  results+=("| \`idemgate consume\` | $label | $counted | $secs | $(rate "$counted" "$secs") |")
}

library "no dedup (plain)" plain
library "memory://" library --store memory://
library "embedded (file:)" library --store "file:$work/lib"
bridge "no dedup (--no-dedup)" --no-dedup --store memory://
bridge "embedded (file:)" --store "file:$work/bridge"
if [ -n "${IDEMGATE_TEST_REDIS_URL:-}" ]; then bridge "Redis" --store "$IDEMGATE_TEST_REDIS_URL"; fi
if [ -n "${IDEMGATE_TEST_POSTGRES_URL:-}" ]; then bridge "PostgreSQL" --store "$IDEMGATE_TEST_POSTGRES_URL"; fi

echo "| path | dedup store | messages | seconds | messages/s |"
echo "| --- | --- | --- | --- | --- |"
printf '%s\n' "${results[@]}"
