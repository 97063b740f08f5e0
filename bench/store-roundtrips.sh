#!/usr/bin/env bash
# Store round trips per first execution and per replay, counted by the servers themselves:
# Redis `INFO commandstats` (script calls) and PostgreSQL `pg_stat_database.xact_commit`
# (every store statement is one autocommitted transaction; other clients of the database would
# be counted too). Replays are each key's FIRST replay on the instance: it fills the local cache,
# so later replays of the same key on that instance cost none. Needs the local Redis (6379) and
# PostgreSQL (5432, database test). Usage: bench/store-roundtrips.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-500}
cargo build --release -q -p idemgate -p idemgate-demo-upstream
target/release/demo-upstream 127.0.0.1:3917 2>/dev/null &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.1; done; exit 1; }
requests() { # port, key prefix
  for i in $(seq "$n"); do
    curl -s -o /dev/null -X POST "http://127.0.0.1:$1/pay" -H "Idempotency-Key: $2-$i" -d '{}'
  done
}
redis_calls() { redis-cli -h 127.0.0.1 info commandstats | awk -F'[:=,]' '/^cmdstat_(evalsha|eval)/ {s += $3} END {print s+0}'; }
pg_commits() { psql -h 127.0.0.1 -U postgres -d test -Atc "select xact_commit from pg_stat_database where datname = 'test'"; }

run() { # name, store url, counter function, seconds for the server's counters to settle
  # Fixed ports below the ephemeral range (random ones there could collide with the many
  # client sockets a benchmark run leaves behind).
  local port=3918 admin=3919 run=$RANDOM$RANDOM
  target/release/idemgate serve --upstream http://127.0.0.1:3917 --store "$2" \
    --namespace idemgate-bench --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin 2>/dev/null &
  local pid=$!
  wait_port $port
  requests $port warm-$run   # connections, prepared statements, script loading
  sleep "$4"
  local a b c
  a=$($3); requests $port k-$run; sleep "$4"; b=$($3)
  requests $port k-$run; sleep "$4"; c=$($3)
  kill $pid; wait $pid 2>/dev/null || true
  awk -v n="$n" -v a="$a" -v b="$b" -v c="$c" -v name="$1" \
    'BEGIN { printf "%-10s first execution: %.2f round trips/request   replay: %.2f round trips/request\n", name, (b-a)/n, (c-b)/n }'
}
run redis redis://127.0.0.1:6379 redis_calls 0.5
# PostgreSQL 15 backends flush their statistics when idle for 10 s.
run postgres postgres://postgres@127.0.0.1:5432/test pg_commits 11
