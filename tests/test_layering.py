"""Import layering (STYLE.md habit 1): algo/ is pure torch; components never import ray or mlflow,
and imports point one way: algo/miniature -> models/rewards -> sampling/learning -> (builders,
actors, driver). A component never imports the layers that assemble or drive it."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "treegrpo_ray"
COMPONENT_DIRS = ("algo", "miniature", "models", "rewards", "sampling", "learning")
# a component may import treegrpo_ray modules of its own rank or below, and nothing above the components
RANK = {"algo": 0, "miniature": 0, "types": 0, "models": 1, "rewards": 1, "sampling": 2, "learning": 2}
ALGO_ALLOWED = {"torch", "math", "dataclasses", "typing", "__future__", "treegrpo_ray"}


def _imports(path: Path, package: str = "treegrpo_ray", with_names: bool = False) -> list[str]:
    """Absolute module names a file imports; relative imports are resolved against `package`,
    the dotted package that holds the file. with_names: `from a import b` gives a.b (b may be a
    module), not a."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names += [f"{module}.{alias.name}" for alias in node.names] if with_names else [module]
    return names


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).parent.parts)


def _files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def loaded_by(modules: str, watched: set[str]) -> list[str]:
    """Which of `watched` (top-level names, or full module names) a fresh interpreter has loaded
    after importing `modules` (comma-separated)."""
    code = (f"import sys, json, {modules}; "
            f"print(json.dumps(sorted({{m for m in sys.modules if m.split('.')[0] in {watched!r} or m in {watched!r}}})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PKG.parent, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_algo_loads_no_heavy_frameworks():
    assert loaded_by("treegrpo_ray.algo", {"ray", "mlflow", "diffusers", "transformers", "treegrpo_ray.config"}) == []


@pytest.mark.parametrize("sub", COMPONENT_DIRS)
def test_components_never_import_ray_or_mlflow(sub):
    offenders = [f"{path.relative_to(PKG.parent)}: {name}" for path in _files(sub)
                 for name in _imports(path, _package_of(path)) if name.split(".")[0] in ("ray", "mlflow")]
    assert offenders == [], "components must not import ray/mlflow:\n" + "\n".join(offenders)


def test_algo_imports_only_torch_and_stdlib():
    files = _files("algo")
    assert files, "treegrpo_ray/algo has no python files"
    offenders = []
    for path in files:
        for name in _imports(path, _package_of(path)):
            top = name.split(".")[0]
            if top not in ALGO_ALLOWED or (top == "treegrpo_ray" and not (
                    name == "treegrpo_ray" or name.startswith("treegrpo_ray.algo"))):
                offenders.append(f"{path.relative_to(PKG.parent)}: {name}")
    assert offenders == [], "algo/ may import only torch, math, dataclasses, typing:\n" + "\n".join(offenders)


def test_checker_catches_a_bad_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom ray.util import queue\nimport mlflow.tracking as t\nfrom . import x\n"
                   "from ..config import Config\n")
    assert _imports(bad, "treegrpo_ray.algo") == ["os", "ray.util", "mlflow.tracking", "treegrpo_ray.algo",
                                                  "treegrpo_ray.config"]


def upward_imports(path: Path) -> list[str]:
    """treegrpo_ray modules `path` (a component file) imports that rank above it or outside the components."""
    own = RANK[path.relative_to(PKG).parts[0]]
    bad = []
    for name in _imports(path, _package_of(path), with_names=True):
        parts = name.split(".")
        if parts[0] != "treegrpo_ray" or len(parts) == 1:
            continue
        if RANK.get(parts[1], 99) > own:
            bad.append(f"{path.relative_to(PKG.parent)}: {name}")
    return bad


@pytest.mark.parametrize("sub", COMPONENT_DIRS)
def test_components_never_import_upward(sub):
    offenders = [o for path in _files(sub) for o in upward_imports(path)]
    assert offenders == [], "a component imports a layer above it (builders/config/actors/driver...):\n" + \
        "\n".join(offenders)


def test_upward_check_catches_one(tmp_path, monkeypatch):
    fake_pkg = tmp_path / "treegrpo_ray"
    (fake_pkg / "models").mkdir(parents=True)
    bad = fake_pkg / "models" / "bad.py"
    bad.write_text("from treegrpo_ray.algo import tree\nfrom treegrpo_ray.rewards import kinds\n"
                   "from treegrpo_ray import builders\nfrom treegrpo_ray.sampling import tree_sampler\n"
                   "from ..config import Config\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake_pkg)
    assert upward_imports(bad) == ["treegrpo_ray/models/bad.py: treegrpo_ray.builders",
                                   "treegrpo_ray/models/bad.py: treegrpo_ray.sampling.tree_sampler",
                                   "treegrpo_ray/models/bad.py: treegrpo_ray.config.Config"]


def test_the_driver_loads_no_model_libraries():
    """The CPU driver of a GPU cluster plans, normalises rewards and logs: importing it must not
    pull in open_clip, diffusers or transformers (they load in the actors)."""
    assert loaded_by("treegrpo_ray.driver, treegrpo_ray.run", {"open_clip", "diffusers", "transformers", "peft",
                                                                "ray"}) == []
    assert "open_clip" in loaded_by("treegrpo_ray.rewards.scorers, open_clip", {"open_clip"})  # the check can fail


def test_the_preflight_of_every_driver_loads_no_clip_library():
    """preflight finds each reward's files before any cluster starts: a file-system check. It once
    imported open_clip (and torchvision) through the reward modules, ~3 CPU-s in every driver and
    in every process that scores a reward without a CLIP model; open_clip now loads with a CLIP model."""
    code = ("import sys; from treegrpo_ray.builders import preflight; from treegrpo_ray.config import load_config; "
            "preflight(load_config(None, [])); "
            "import treegrpo_ray.rewards.scorers, treegrpo_ray.rewards.aesthetic, treegrpo_ray.rewards.imagereward; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PKG.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_readme_layout_names_every_module_and_package():
    """README's Layout block is the map a newcomer reads: every package and top-level module of
    treegrpo_ray/ appears in it, and it names nothing that is gone."""
    import re
    readme = (PKG.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    here = {p.name for p in PKG.iterdir() if p.suffix == ".py" and p.name != "__init__.py"}
    here |= {f"{p.name}/" for p in PKG.iterdir() if p.is_dir() and (any(p.glob("*.py")) or p.name in ("configs", "assets"))}
    missing = sorted(name for name in here if name not in block)
    assert missing == [], f"README's Layout does not mention: {missing}"
    named = set(re.findall(r"\b([a-z_]+\.py)\b", block))
    known = {p.name for p in PKG.rglob("*.py")} | {p.name for p in (PKG.parent / "tools").rglob("*.py")}
    assert sorted(named - known) == [], "README's Layout names modules that do not exist"
