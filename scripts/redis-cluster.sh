#!/usr/bin/env bash
# A throwaway 3-master Redis Cluster on loopback, for tests.
#   scripts/redis-cluster.sh start DIR [FIRST_PORT]  → prints the node list "h:p,h:p,h:p"
#   scripts/redis-cluster.sh stop DIR                → stops exactly the servers it started (PIDs in DIR)
set -euo pipefail
cmd=$1 dir=$2 first=${3:-7101}
case "$cmd" in
start)
  mkdir -p "$dir"
  nodes=()
  for port in $first $((first + 1)) $((first + 2)); do
    mkdir -p "$dir/$port"
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$dir/$port/nodes.conf" --dir "$dir/$port" \
      --save "" --appendonly no --daemonize yes --pidfile "$dir/$port/redis.pid" \
      --logfile "$dir/$port/redis.log"
    nodes+=("127.0.0.1:$port")
  done
  for port in $first $((first + 1)) $((first + 2)); do
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1
  for _ in $(seq 100); do
    ok=1
    for port in $first $((first + 1)) $((first + 2)); do
      redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' || ok=0
    done
    [ $ok = 1 ] && break
    sleep 0.1
  done
  [ $ok = 1 ] || { echo "redis cluster did not become ready" >&2; exit 1; }
  (IFS=,; echo "${nodes[*]}")
  ;;
stop)
  # Kill, then wait until each server has exited: a server writes nodes.conf as it shuts down,
  # so a caller's `rm -rf DIR` right after a bare kill can race it ("Directory not empty").
  pids=()
  for pidfile in "$dir"/*/redis.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  ;;
esac
