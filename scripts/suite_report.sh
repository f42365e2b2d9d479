#!/usr/bin/env bash
# A report of the suite's time, not a test: runs each tier as scripts/test.sh does and prints its
# wall time, how busy the machine's cores were, its ten slowest tests, and each worker's timeline
# (which module ran when, beside which). Budget on this project's 2-core machine (DEVELOPERS.md):
# default tier <= 10 min, all of .ci/run (install + both tiers) <= 40 min.
#   bash scripts/suite_report.sh              both tiers
#   bash scripts/suite_report.sh default      one tier (default | integration)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
tiers=("${@:-default integration}")
summary=""
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }  # busy and total jiffies
for tier in ${tiers[@]}; do
    if [[ "$tier" == "integration" ]]; then marks="integration and not slow"; workers=(-n 2 --dist loadfile --no-loadscope-reorder)
    else marks="not slow and not integration"; workers=(-n 3 --dist loadfile --no-loadscope-reorder); fi  # as scripts/test.sh
    log=$(mktemp)
    export TREEGRPO_TEST_TIMELINE=$(mktemp)
    start=$(date +%s)
    read -r b0 t0 < <(busy)
    python -m pytest -q -m "$marks" "${workers[@]}" --durations=10 -p no:cacheprovider > "$log" 2>&1
    code=$?
    read -r b1 t1 < <(busy)
    secs=$(( $(date +%s) - start ))
    echo "=== $tier tier: $((secs / 60)) min $((secs % 60)) s (exit $code); cores busy $(( 100 * (b1 - b0) / (t1 - t0) ))% of the run"
    sed -n '/slowest 10 durations/,/^$/p' "$log" | sed '1d'
    echo "timeline (minutes from the tier's start; each worker's modules in the order it ran them):"
    python - "$TREEGRPO_TEST_TIMELINE" "$start" <<'PY'
import collections, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
if any(r[2] != "main" for r in rows):  # under xdist the controller sees each test's report too
    rows = [r for r in rows if r[2] != "main"]
start, mods = float(sys.argv[2]), collections.OrderedDict()
for s, e, worker, nodeid in sorted(rows, key=lambda r: float(r[0])):
    key = (worker, nodeid.split("::")[0])
    a, b = mods.get(key, (float(s), float(e)))
    mods[key] = (min(a, float(s)), max(b, float(e)))
for (worker, mod), (a, b) in sorted(mods.items(), key=lambda kv: (kv[0][0], kv[1][0])):
    print(f"  {worker:5s} {(a - start) / 60:5.1f} -> {(b - start) / 60:5.1f}  {mod}")
PY
    tail -n 1 "$log"
    summary+="$tier: $((secs / 60)) min $((secs % 60)) s; "
    rm -f "$log" "$TREEGRPO_TEST_TIMELINE"
done
echo "=== ${summary% }"
