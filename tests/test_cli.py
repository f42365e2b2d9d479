"""The entry point as a user runs it: `python -m treegrpo_ray.run ...` in a subprocess."""
import json
import os
import re
import subprocess
import sys

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "treegrpo_ray.run", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_help_lists_every_field():
    out = cli("--help", timeout=60)
    assert out.returncode == 0
    assert "tree.k = 3" in out.stdout and "pools.samplers = 1" in out.stdout and "learner.workers" in out.stdout


def test_config_error_exits_2_before_anything_starts():
    out = cli("tree.k=1", timeout=60)
    assert out.returncode == 2
    assert "config error: tree.k: branching factor 1 < 2" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_prompt_file_is_a_config_error(tmp_path):
    out = cli("mode=local", f"prompts={tmp_path}/nope.txt", f"tracking.output_dir={tmp_path}", timeout=60)
    assert out.returncode == 2 and "prompt file" in out.stderr and "does not exist" in out.stderr


def test_print_config_resolves_yaml_and_overrides():
    out = cli("--config", "configs/flat.yaml", "tree.group_size=8", "--print-config", timeout=60)
    cfg = json.loads(out.stdout)
    assert cfg["tree"]["variant"] == "flat" and cfg["tree"]["group_size"] == 8


def test_local_smoke_run_prints_progress(tiny_sd3_dir, tmp_path):
    out = cli("--config", "configs/smoke.yaml", "mode=local", f"model.pretrained={tiny_sd3_dir}",
              "prompts=configs/prompts/example_prompts.txt", "rewards.terms.0.name=jpeg_compressibility",
              f"tracking.output_dir={tmp_path}", "--summary-json", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("iter ")]
    assert len(lines) == 2 and "s/it" in lines[0] and "nfe" in lines[0]
    assert re.search(r"\| eta \d+:\d\d$", lines[0]) and lines[1].endswith("| eta 0:00")   # time left
    assert "MLflow" in out.stdout and "done:" in out.stdout
    assert json.loads((tmp_path / "s.json").read_text())["iterations"] == 2
