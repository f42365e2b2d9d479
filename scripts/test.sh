#!/usr/bin/env bash
# The test command from the README: install the project with its test extra, run the suite.
# Long soak/benchmark tests are marked `slow` and deselected here (run them with `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
python -m pytest -q -m "not slow" "$@"
