#!/usr/bin/env bash
# The test command from the README: install the project with its test extra, run the suite.
#   bash scripts/test.sh               default tier: pytest -m "not slow and not integration", in 3
#                                      pytest-xdist workers, a test module per worker (most of its
#                                      tests wait on processes: 7.5 min instead of 12.5 here)
#   bash scripts/test.sh integration   integration tier: real services (loopback S3 server,
#                                      ray start --head + ray job submit from a fresh folder, the
#                                      multi-node loopback cluster, the learning test), in 2
#                                      workers: the cluster's module on one, the rest on the other
# Long soak/benchmark tests are marked `slow` and run with `pytest -m slow`. Extra arguments
# after the tier go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
# bytecode for the package, once: where PYTHONDONTWRITEBYTECODE is set (this project's machines set
# it) every Ray worker, CLI subprocess and actor restart would compile it from source again
python -m compileall -q treegrpo_ray tools bench deploy > /dev/null
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
if [[ "${1:-}" == "integration" ]]; then
    shift
    python -m pytest -q -m "integration and not slow" -n 2 --dist loadfile --no-loadscope-reorder "$@"
else
    python -m pytest -q -m "not slow and not integration" -n 3 --dist loadfile --no-loadscope-reorder "$@"
fi
