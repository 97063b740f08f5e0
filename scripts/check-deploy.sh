#!/usr/bin/env bash
# Checks the operator files under deploy/ with promtool (Debian's `prometheus` package):
# - deploy/prometheus/alerts.yml: `promtool check rules`, then its unit tests
#   (deploy/prometheus/alerts_test.yml, `promtool test rules`);
# - deploy/grafana/idemgate.json: every panel's PromQL parses (each expression, with Grafana's
#   variables replaced by plain values, becomes a recording rule that `promtool check rules`
#   reads).
# That every metric these files name exists in a real scrape of `idemgate serve` is checked by
# crates/idemgate/tests/proxy_signals.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v promtool >/dev/null || { echo "check-deploy: promtool is missing (apt-get install prometheus)" >&2; exit 1; }

promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 - deploy/grafana/idemgate.json "$scratch/dashboard-rules.yml" <<'PY'
import json, sys

dashboard = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for p in panels:
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
        walk(p.get("panels", []))
walk(dashboard["panels"])
if not exprs:
    sys.exit("check-deploy: the dashboard has no queries")
plain = {"$__rate_interval": "5m", "$__range": "1h", "$job": ".*", "$instance": ".*"}
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, expr) in enumerate(exprs):
        for var, value in plain.items():
            expr = expr.replace(var, value)
        if "$" in expr:
            sys.exit(f"check-deploy: panel {title!r} uses an unknown variable: {expr}")
        out.write(f"      - record: dashboard:expr_{i}\n        expr: {json.dumps(expr)}\n")
print(f"dashboard: {len(exprs)} queries")
PY
promtool check rules "$scratch/dashboard-rules.yml"
