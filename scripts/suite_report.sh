#!/usr/bin/env bash
# A report of the suite's time, not a test: runs each tier as scripts/test.sh does and prints its
# wall time and its ten slowest tests. Budget on this project's 2-core machine (DEVELOPERS.md):
# default tier <= 10 min, all of .ci/run (install + both tiers) <= 40 min.
#   bash scripts/suite_report.sh              both tiers
#   bash scripts/suite_report.sh default      one tier (default | integration)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
tiers=("${@:-default integration}")
summary=""
for tier in ${tiers[@]}; do
    if [[ "$tier" == "integration" ]]; then marks="integration and not slow"; workers=(-n 2 --dist loadfile --no-loadscope-reorder)
    else marks="not slow and not integration"; workers=(-n 3 --dist loadfile --no-loadscope-reorder); fi  # as scripts/test.sh
    log=$(mktemp)
    start=$(date +%s)
    python -m pytest -q -m "$marks" "${workers[@]}" --durations=10 -p no:cacheprovider > "$log" 2>&1
    code=$?
    secs=$(( $(date +%s) - start ))
    echo "=== $tier tier: $((secs / 60)) min $((secs % 60)) s (exit $code)"
    sed -n '/slowest 10 durations/,/^$/p' "$log" | sed '1d'
    tail -n 1 "$log"
    summary+="$tier: $((secs / 60)) min $((secs % 60)) s; "
    rm -f "$log"
done
echo "=== ${summary% }"
