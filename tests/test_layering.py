"""Import layering (STYLE.md habit 1): algo/ is pure torch; components never import ray or mlflow."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "treegrpo_ray"
COMPONENT_DIRS = ("algo", "models", "rewards", "sampling", "learning", "toy")
ALGO_ALLOWED = {"torch", "math", "dataclasses", "typing", "__future__", "treegrpo_ray"}


def _imports(path: Path, package: str = "treegrpo_ray") -> list[str]:
    """Absolute module names a file imports; relative imports are resolved against `package`,
    the dotted package that holds the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


def _package_of(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).parent.parts)


def _files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def test_import_algo_loads_no_heavy_frameworks():
    code = ("import sys, json, treegrpo_ray.algo; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'mlflow', 'diffusers', 'transformers') or m == 'treegrpo_ray.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=PKG.parent, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


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
