"""scripts/gpu_check.sh's Python part, run on CPU: the same code a GPU user runs, minus CUDA memory
and the Ray run (which tests/test_local_ray.py and the integration tier cover)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_and_reports_its_figures(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--no-ray",
                          "--prompts", "1", "--out", "check.json"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    tp = result["throughput"]
    # one tree (bf16 on a CPU is slow: 2 trees took ~140 s of the default tier); the row accounting is per tree
    assert tp["ours_rows"] == 13 + 27 * 7             # window at step 0: 13 decisions + 27 leaves x 7 ODE steps
    assert tp["bare_rows"] == 27 * 7                  # the pipeline's loop: 27 rows, round(202 / 27) = 7 steps
    assert tp["ours_rows_per_s"] > 0 and tp["bare_rows_per_s"] > 0
    assert result["rescoring_max_abs_ratio_minus_1"] <= 1e-3
    assert "throughput:" in out.stdout and "rescoring:" in out.stdout


def test_gpu_check_refuses_without_cuda(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 1 and "no CUDA device visible" in out.stderr
