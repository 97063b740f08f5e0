#!/usr/bin/env bash
# Load benchmarks: the upstream alone, nginx as a plain reverse proxy, and idemgate on every
# store, back to back, on the first-execution, replay and pass-through paths.
#
#   bench/run.sh            full run (release build, 3 repetitions, 1/16/64 connections with
#                           an instant upstream, 16 with a 5 ms one; about 14 minutes) and
#                           regenerates the tables in docs/performance.md
#   bench/run.sh --quick    smoke run (debug build unless BENCH_PROFILE is set, 1 repetition,
#                           16 connections, short windows; under 2 minutes). It asserts only that
#                           every target answered every request correctly, never a speed.
#
# Needs nginx (Debian package nginx-light or nginx), Redis and PostgreSQL (URLs from
# IDEMGATE_TEST_REDIS_URL / IDEMGATE_TEST_POSTGRES_URL, defaults the local servers). Set
# BENCH_STORES to a subset of "memory file file-redb redis postgres" to skip stores (`file` is
# the default embedded engine, fjall; `file-redb` the same URL with `?engine=redb`).
#
# The peer: ldclabs' idempotent-proxy (crates.io `idempotent-proxy-server`, pinned below), on its
# memory and Redis backends, first executions and replays, same upstream and load. A full run
# installs it with `cargo install` into target/bench-peer on first use (a few minutes, once);
# BENCH_PEER=0 leaves it out, BENCH_PEER=1 adds it to a --quick run. Its Redis keys go to Redis
# database 3 (BENCH_PEER_REDIS_URL), away from idemgate's.
#
# CPU: nothing is pinned. The load generator (one thread), the upstream (one thread), the proxy
# under test (two worker threads / two nginx workers) and, for shared stores, Redis or PostgreSQL
# all share the machine's cores; every target sees the same arrangement, so ratios between them
# are fair, and absolute figures are lower than on a machine with a core per process.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0 report_only=""
[[ "${1:-}" == "--quick" ]] && quick=1
# `bench/run.sh --report DIR`: regenerate docs/performance.md from an earlier run's directory.
if [[ "${1:-}" == "--report" ]]; then report_only=${2:?usage: bench/run.sh --report DIR}; fi
if ((quick)); then
  reps=${BENCH_REPS:-1} duration=${BENCH_DURATION_MS:-800} warmup=${BENCH_WARMUP_MS:-200}
  conns=${BENCH_CONNS:-16} delays=${BENCH_DELAYS:-0} profile=${BENCH_PROFILE:-dev}
  footprint_records=${BENCH_FOOTPRINT_RECORDS:-20000}
else
  reps=${BENCH_REPS:-3} duration=${BENCH_DURATION_MS:-3000} warmup=${BENCH_WARMUP_MS:-1000}
  conns=${BENCH_CONNS:-"1 16 64"} delays=${BENCH_DELAYS:-"0 5"} profile=${BENCH_PROFILE:-release}
  footprint_records=${BENCH_FOOTPRINT_RECORDS:-1000000}
fi
stores=${BENCH_STORES:-"memory file file-redb redis postgres"}
peer=${BENCH_PEER:-$((1 - quick))}
peer_version=1.2.2
peer_bin=${BENCH_PEER_BIN:-target/bench-peer/bin/idempotent-proxy-server}
peer_stores=${BENCH_PEER_STORES:-"memory redis"}
# With a service time, only this connection count (the latency target is at 16).
delayed_conns=${BENCH_DELAYED_CONNS:-16}
redis_url=${IDEMGATE_TEST_REDIS_URL:-redis://127.0.0.1:6379}
postgres_url=${IDEMGATE_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
peer_redis_url=${BENCH_PEER_REDIS_URL:-redis://127.0.0.1:6379/3}

command -v nginx >/dev/null || { echo "bench: nginx is not installed (apt-get install nginx-light)" >&2; exit 1; }

cargo build --profile "$profile" -q -p idemgate -p idemgate-bench
if ((peer)) && [[ ! -x "$peer_bin" ]]; then
  echo "bench: installing idempotent-proxy-server $peer_version (the peer; once) into target/bench-peer"
  cargo install -q --locked idempotent-proxy-server --version "$peer_version" --root target/bench-peer
fi
bin=target/$([[ "$profile" == dev ]] && echo debug || echo "$profile")

if [[ -n "$report_only" ]]; then
  work=$report_only
else
  work=$(mktemp -d /tmp/idemgate-bench.XXXXXX)
fi
results=$work/results.jsonl
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() { # port
  for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "bench: nothing listens on port $1" >&2
  return 1
}
stop() { # pid
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

upstream_port=3950 proxy_port=3951 admin_port=3952
failed=0
# The request path loadgen posts to (the peer maps /URL_UP to the upstream).
path=/payments

measure() { # target store mode connections delay rep
  # Every answer of ours is checked (--check fails the run); the peer's are counted and shown
  # (its wrong answers are a finding to report, not a failure of this script).
  local check=--check
  [[ "$1" == idempotent-proxy ]] && check=
  if ! "$bin/loadgen" --addr 127.0.0.1:"$proxy_port" --path "$path" --target "$1" --store "$2" --mode "$3" \
    --connections "$4" --delay-ms "$5" --rep "$6" --duration-ms "$duration" --warmup-ms "$warmup" \
    --out "$results" $check >/dev/null; then
    failed=1
  fi
  tail -n1 "$results" | awk -v t="$1 $2 $3 c=$4 d=$5 rep=$6" -F'"rps":' '{split($2, a, ","); printf "  %-40s %10.0f req/s", t, a[1]}'
  tail -n1 "$results" | awk -F'"non_2xx":' '{split($2, a, ","); if (a[1] > 0) printf "   (%d answers not 2xx)", a[1]}'
  echo
}

start_nginx() {
  mkdir -p "$work/nginx"
  sed -e "s|@PREFIX@|$work/nginx|g" -e "s|@LISTEN@|127.0.0.1:$proxy_port|" \
    -e "s|@UPSTREAM@|127.0.0.1:$upstream_port|" bench/nginx.conf.in >"$work/nginx/nginx.conf"
  nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
  target_pid=$!
}

start_idemgate() { # store
  local url
  case "$1" in
    memory) url=memory:// ;;
    file) rm -rf "$work/file-store"; url=file:$work/file-store ;;
    file-redb) rm -rf "$work/file-redb"; url="file:$work/file-redb?engine=redb" ;;
    redis) url=$redis_url ;;
    postgres) url=$postgres_url ;;
  esac
  # Short TTL: the shared stores get a few hundred thousand records per run. A namespace of its
  # own: idemgate refuses a shared store (Redis, PostgreSQL) without one.
  RUST_LOG=warn "$bin/idemgate" serve --upstream http://127.0.0.1:$upstream_port --store "$url" \
    --namespace idemgate-bench \
    --listen 127.0.0.1:$proxy_port --admin-listen 127.0.0.1:$admin_port --ttl 3m \
    2>>"$work/idemgate.log" &
  target_pid=$!
}

start_peer() { # store
  # It reads a .env file from its working directory (and stops without one), the upstream URL
  # from URL_<NAME> (requests go to /URL_<NAME>), its backend from REDIS_URL (memory without).
  mkdir -p "$work/peer"
  : >"$work/peer/.env"
  if [[ "$1" == redis ]]; then
    redis-cli -u "$peer_redis_url" flushdb >/dev/null
    export REDIS_URL=$peer_redis_url
  else
    unset REDIS_URL
  fi
  local exe
  exe=$(realpath "$peer_bin")
  (cd "$work/peer" && SERVER_ADDR=127.0.0.1:$proxy_port URL_UP=http://127.0.0.1:$upstream_port/payments \
    LOG_LEVEL=warn exec "$exe" >/dev/null 2>>"$work/peer.log") &
  target_pid=$!
  unset REDIS_URL
  path=/URL_UP
}

run_target() { # target store delay rep
  case "$1" in
    upstream) proxy_port_saved=$proxy_port; proxy_port=$upstream_port ;;
    nginx) start_nginx ;;
    idemgate) start_idemgate "$2" ;;
    idempotent-proxy) start_peer "$2" ;;
  esac
  wait_port "$proxy_port"
  local modes="unique"
  [[ "$1" == idemgate ]] && modes="unique replay none"
  [[ "$1" == idempotent-proxy ]] && modes="unique replay"
  local cs=$conns
  [[ "$3" != 0 ]] && cs=$delayed_conns
  for c in $cs; do
    for m in $modes; do measure "$1" "$2" "$m" "$c" "$3" "$4"; done
  done
  if [[ "$1" == upstream ]]; then proxy_port=$proxy_port_saved; else stop "$target_pid"; fi
  path=/payments
}

if [[ -z "$report_only" ]]; then
echo "bench: profile $profile, $reps repetition(s), ${duration} ms windows (+${warmup} ms warm-up), connections: $conns, upstream delays: $delays ms, stores: $stores"
for rep in $(seq "$reps"); do
  for delay in $delays; do
    "$bin/bench-upstream" --listen 127.0.0.1:$upstream_port --delay-ms "$delay" >/dev/null &
    upstream_pid=$!
    pids+=("$upstream_pid")
    wait_port $upstream_port
    run_target upstream "" "$delay" "$rep"
    run_target nginx "" "$delay" "$rep"
    for store in $stores; do run_target idemgate "$store" "$delay" "$rep"; done
    if ((peer)); then
      for store in $peer_stores; do run_target idempotent-proxy "$store" "$delay" "$rep"; done
    fi
    stop "$upstream_pid"
  done
done

echo "bench: record footprint ($footprint_records records)"
for rep in $(seq "$reps"); do "$bin/record-footprint" --records "$footprint_records" >>"$work/footprint.jsonl"; done
cat "$work/footprint.jsonl"

if ((!quick)); then
  echo "bench: store round trips"
  if ! bench/store-roundtrips.sh 300 >"$work/roundtrips.txt"; then
    echo "bench: the round-trip count failed" >&2
    failed=1
  fi
  cat "$work/roundtrips.txt"
fi
fi

report=$work/report.md
"$bin/bench-report" "$results" --footprint "$work/footprint.jsonl" \
  $([[ -f "$work/roundtrips.txt" ]] && echo --roundtrips "$work/roundtrips.txt") >"$report"
cat "$report"

if ((!quick)); then
  # Replace the generated section of docs/performance.md.
  {
    sed '/<!-- bench:start -->/q' docs/performance.md
    echo
    echo "Generated by \`bench/run.sh\` on $(date -u +%Y-%m-%d) at commit \`$(git rev-parse --short HEAD)\`$(git diff --quiet HEAD -- crates || echo ' (with uncommitted changes)'); $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(nginx -v 2>&1 | sed 's|nginx version: ||'), $(rustc --version | cut -d' ' -f1-2)."
    echo
    cat "$report"
    echo
    sed -n '/<!-- bench:end -->/,$p' docs/performance.md
  } >"$work/performance.md"
  cp "$work/performance.md" docs/performance.md
  mkdir -p bench/results && cp "$results" bench/results/loadgen.jsonl && cp "$work/footprint.jsonl" bench/results/footprint.jsonl
  echo "bench: docs/performance.md updated; raw results in $work"
fi

if ((failed)); then
  echo "bench: some target answered wrongly (see the lines above and $work)" >&2
  exit 1
fi
echo "bench: every target answered every request correctly"
