"""Security properties: weights load only from safe formats, a locally started Ray is
loopback-first and token-authenticated, MLflow params / printed output / run files carry no
credentials, and the shipped configs hold none."""
import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from treegrpo_ray import driver, run_folder
from treegrpo_ray.actors import ray_system
from treegrpo_ray.config import flatten, load_config
from treegrpo_ray.tracking import tracking_uri

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "treegrpo_ray"
SECRET = "hunter2-s3cr3t"


# ----------------------------------------------------------------------------- safe loading

def unsafe_loads(source: str) -> list[str]:
    """Calls that can unpickle arbitrary objects: torch.load without weights_only=True, pickle /
    dill / joblib / cloudpickle loads, yaml.load / unsafe_load, np.load(allow_pickle=True)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = f"{owner}.{node.func.attr}"
        kw = {k.arg: k.value for k in node.keywords}

        def const(key):
            return isinstance(kw.get(key), ast.Constant) and kw[key].value is True
        if name == "torch.load" and not const("weights_only"):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif owner in ("pickle", "dill", "joblib", "cloudpickle") and node.func.attr in ("load", "loads"):
            found.append(f"line {node.lineno}: {name}")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"line {node.lineno}: {name}")
        elif name in ("np.load", "numpy.load") and const("allow_pickle"):
            found.append(f"line {node.lineno}: {name}(allow_pickle=True)")
    return found


def test_the_scanner_catches_unsafe_loads():
    bad = textwrap.dedent("""
        import pickle, torch, yaml
        torch.load("a.pt")
        torch.load("b.pt", weights_only=False)
        pickle.loads(blob)
        yaml.load(text)
        np.load("x.npy", allow_pickle=True)
        torch.load("ok.pt", map_location="cpu", weights_only=True)
        yaml.safe_load(text)
    """)
    assert [f.split(": ")[1] for f in unsafe_loads(bad)] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True", "pickle.loads",
        "yaml.load", "np.load(allow_pickle=True)"]


def test_package_loads_weights_only_from_safe_formats():
    offenders = {str(p.relative_to(ROOT)): f for p in sorted(PACKAGE.rglob("*.py"))
                 if (f := unsafe_loads(p.read_text()))}
    assert offenders == {}
    # and the two places that do load checkpoints say how
    assert "weights_only=True" in (PACKAGE / "checkpoint.py").read_text()
    assert "load_file" in (PACKAGE / "checkpoint.py").read_text()  # safetensors for weights


class Payload:
    """Unpickling this would run code in a full pickle load."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pipeline_weights_with_a_pickle_payload_are_refused(tiny_sd3_dir, tmp_path):
    # The policy loads through diffusers' from_pretrained: a transformer saved as a .bin pickle
    # holding code must be refused (torch.load(weights_only=True) inside diffusers), not run.
    from treegrpo_ray.models.policy import DiffusionPolicy
    pipe = tmp_path / "pipeline"
    shutil.copytree(tiny_sd3_dir, pipe)
    for f in (pipe / "transformer").glob("*.safetensors"):
        f.unlink()
    torch.save({"weight": Payload()}, pipe / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception) as caught:
        DiffusionPolicy.from_pretrained(str(pipe), dtype=torch.float32, device="cpu")
    chain, e = [], caught.value
    while e is not None:  # diffusers wraps the refusal; the root cause is weights_only's
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    assert any("Weights only load failed" in c for c in chain), chain


# ----------------------------------------------------------------------------- loopback Ray, MLflow

def smoke(tmp_path, *extra):
    return load_config("configs/smoke.yaml", ["prompts=configs/prompts/example_prompts.txt",
                                              "rewards.terms.0.name=jpeg_compressibility",
                                              f"tracking.output_dir={tmp_path}", *extra])


def test_connect_starts_a_loopback_only_local_instance(tmp_path, monkeypatch):
    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_system.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_system.ray, "init", lambda **kw: calls.append(kw))
    # no instance really starts: nothing to record or reap (else this test depends on the Ray
    # tests before it having started one)
    monkeypatch.setattr(ray_system.local_ray, "record_session", lambda: None)
    monkeypatch.setattr(ray_system.local_ray, "reap_orphans", lambda: [])
    assert ray_system.connect(smoke(tmp_path)) is True
    (kw,) = calls
    assert kw["address"] == "local"                   # never attaches to a stray cluster
    assert kw["_node_ip_address"] == "127.0.0.1" and kw["dashboard_host"] == "127.0.0.1"
    assert set(kw["runtime_env"]["env_vars"]) == {"RAY_USAGE_STATS_ENABLED", "HF_HUB_OFFLINE"}  # no secrets shipped


@pytest.mark.ray
def test_a_started_local_instance_listens_on_loopback_and_requires_a_token(tmp_path):
    # A fresh instance in a subprocess (the shared test cluster is not started by connect()).
    script = textwrap.dedent(f"""
        import json, os, psutil, ray
        from treegrpo_ray.config import load_config
        from treegrpo_ray.actors.ray_system import connect
        cfg = load_config("configs/smoke.yaml", ["prompts=configs/prompts/example_prompts.txt",
                          "rewards.terms.0.name=jpeg_compressibility", "ray_num_cpus=1"])
        assert connect(cfg)
        me = psutil.Process()
        mine = {{me.pid}} | {{p.pid for p in me.children(recursive=True)}}
        listen = [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                  if c.status == psutil.CONN_LISTEN and c.pid in mine]
        info = {{"listen": listen, "auth": os.environ.get("RAY_AUTH_MODE"),
                 "dashboard": ray._private.worker._global_node.webui_url}}
        ray.shutdown()
        print("INFO" + json.dumps(info))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("INFO")]
    assert line, out.stderr[-3000:]
    info = json.loads(line[0][4:])
    host, port = info["dashboard"].rsplit(":", 1)
    assert host == "127.0.0.1"
    assert {ip for ip, p in info["listen"] if p == int(port)} == {"127.0.0.1"}  # dashboard HTTP: loopback only
    # Ray's own gRPC servers (GCS, raylet, workers) listen on every interface whatever the node
    # IP (Ray 2.60 resolves 127.0.0.1 to the routable address, services.resolve_ip_for_localhost);
    # what guards them is token auth, which Ray turns on for a new local instance.
    assert info["auth"] == "token", info


def test_default_mlflow_store_is_a_local_file_not_a_server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    for p in PACKAGE.rglob("*.py"):  # the package never starts an MLflow (or any) server on all interfaces
        assert "0.0.0.0" not in p.read_text(), p


# ----------------------------------------------------------------------------- no credentials leak

def test_flatten_redacts_secret_keys_and_uri_credentials(tmp_path):
    cfg = smoke(tmp_path, f"tracking.mlflow_uri=https://alice:{SECRET}@mlflow.example.com/",
                f"ray_address=ray://bob:{SECRET}@head.example.com:10001",
                "rewards.terms.0.name=hpsv2", f"rewards.terms.0.checkpoint=s3://key:{SECRET}@bucket/hps.pt",
                f"tracking.output_dir=s3://b/out?endpoint_override=127.0.0.1:9000&access_key=AK&secret_key={SECRET}")
    flat = flatten(cfg)
    assert flat["tracking.mlflow_uri"] == "https://***@mlflow.example.com/"
    assert flat["ray_address"] == "ray://***@head.example.com:10001"
    assert flat["rewards.terms.0.checkpoint"] == "s3://***@bucket/hps.pt"
    # credentials in a query string (how pyarrow takes S3 options) are masked, the rest kept
    assert flat["tracking.output_dir"] == "s3://b/out?endpoint_override=127.0.0.1:9000&access_key=***&secret_key=***"
    assert not any(SECRET in v for v in flat.values())
    assert flatten(cfg, redact=False)["ray_address"].endswith("head.example.com:10001")  # only redaction hides it
    assert run_folder.redact_uri(f"https://alice:{SECRET}@mlflow.example.com/x") == "https://***@mlflow.example.com/x"
    assert run_folder.redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert SECRET not in json.dumps(run_folder.redacted_config(cfg))


def test_a_run_logs_no_credentials(tiny_sd3_dir, tmp_path, monkeypatch):
    # A secret-bearing ray_address (unused in local mode) must not reach MLflow params or tags,
    # the printed output, the summary or the run's config.json.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # mlflow exports it; keep this run in its own store
    cfg = load_config("configs/smoke.yaml", [
        f"model.pretrained={tiny_sd3_dir}", "prompts=configs/prompts/example_prompts.txt",
        "rewards.terms.0.name=jpeg_compressibility", f"tracking.output_dir={tmp_path}", "tracking.run_name=r",
        "mode=local", "iterations=1", f"ray_address=ray://bob:{SECRET}@head.example.com:10001"])
    printed = io.StringIO()
    summary = driver.run(cfg, out=printed)
    run = mlflow.MlflowClient(summary["mlflow_uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.params["ray_address"] == "ray://***@head.example.com:10001"
    texts = [*run.data.params.values(), *run.data.tags.values(), printed.getvalue(), json.dumps(summary),
             (tmp_path / "r" / "config.json").read_text()]
    assert not [t for t in texts if SECRET in t]


SECRET_PATTERNS = [
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),             # Hugging Face token
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),              # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),      # GitHub token
    re.compile(r"\bsk-[A-Za-z0-9]{20,}"),             # API keys of the OpenAI kind
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),            # user:password@ in a URI
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_hold_no_credentials(path):
    text = path.read_text()
    assert not [p.pattern for p in SECRET_PATTERNS if p.search(text)]
    cfg = load_config(path, ["prompts=configs/prompts/example_prompts.txt"])
    assert flatten(cfg) == flatten(cfg, redact=False)  # nothing in it needed redacting
    for key, value in flatten(cfg, redact=False).items():
        if any(w in key.lower() for w in ("token", "password", "secret", "api_key", "credential")):
            assert value in ("", "None"), key
    assert yaml.safe_load(text) is not None


def test_the_credential_patterns_match_what_they_should():
    samples = ["hf_" + "a" * 34, "AKIA" + "B" * 16, "ghp_" + "c" * 36, "sk-" + "d" * 40,
               "https://u:p@host/x", "-----BEGIN RSA PRIVATE KEY-----"]
    assert all(any(p.search(s) for p in SECRET_PATTERNS) for s in samples)
    assert not any(p.search("https://host.example.com/x and hf_short") for p in SECRET_PATTERNS)
