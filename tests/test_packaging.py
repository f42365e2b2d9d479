"""A plain (non-editable) install, as the Dockerfile's `pip install ./src` makes it, used from a
fresh folder: the named configs and their prompt file ship in the package, `--config <name>`
finds them, and the miniature assets are there."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import treegrpo_ray, sys
from pathlib import Path
assert Path(treegrpo_ray.__file__).is_relative_to(Path(sys.argv[1])), treegrpo_ray.__file__
from treegrpo_ray.builders import MINIATURE_DIR, load_prompts
from treegrpo_ray.config import ConfigError, load_config
for name in ("sd35m_hps", "sd35m_hps.yaml", "configs/sd35m_hps.yaml"):
    assert len(load_prompts(load_config(name))) == 8
assert load_config("smoke").iterations == 2
assert (MINIATURE_DIR / "pipeline" / "model_index.json").is_file()
try:
    load_config("no_such_config")
except ConfigError as e:
    assert "does not exist" in str(e) and "sd35m_hps" in str(e) and "smoke" in str(e), e
else:
    raise AssertionError("no error for an unknown config name")
print("PLAIN_INSTALL_OK")
"""


def test_a_plain_install_finds_named_configs_from_any_folder(tmp_path):
    had_build = (ROOT / "build").exists()
    site = tmp_path / "site"
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(ROOT)], check=True, capture_output=True, timeout=300)
    finally:
        if not had_build:
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert sorted(p.name for p in (site / "treegrpo_ray" / "configs").glob("*.yaml")) == sorted(
        p.name for p in (ROOT / "configs").glob("*.yaml"))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(site)], cwd=fresh, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "PLAIN_INSTALL_OK" in out.stdout, out.stderr[-3000:]
