"""Static checks of deploy/ (KubeRay manifests) and docker/ (the image) against the code's contract.

Schema: every RayJob / RayCluster validates against KubeRay's CRD schema (../shared/kuberay-schema,
JSON Schema Draft 7, strict `additionalProperties: false`). The rest is what that schema cannot say:
the submissionMode value, worker groups named after the config's pools, every Ray resource a pool
asks for declared by its own group and fitting in `replicas` pods, images / rayVersion / Dockerfile
consistent with pyproject's Ray pin, security context and resources on every container, no inline
credentials. The local emulation of the smoke manifest is in test_deploy_emulation.py.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest

from deploy.render_pods import (RAY_KINDS, as_pods, autoscaler_container, cluster_spec,
                                load_manifests, pod_templates)
from treegrpo_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA_DIR = REPO / "tests" / "data" / "kuberay-schema"  # KubeRay v1.7 CRD schemas (README there)
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
PYPROJECT = (REPO / "pyproject.toml").read_text()
RAY_PIN = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', PYPROJECT).group(1)
PROJECT_VERSION = re.search(r'(?m)^version = "([^"]+)"', PYPROJECT).group(1)
# KubeRay's CRD has no enum for it; these are the modes the operator implements.
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
POOLS = ("sampler", "reward", "learner")
IMAGE_UID = 1000  # the `ray` user of rayproject/ray images

MANIFESTS = [(p, d) for p, d in load_manifests() if d.get("kind") in RAY_KINDS]
RAYJOBS = [(p, d) for p, d in MANIFESTS if d["kind"] == "RayJob"]
SIZES = sorted({p.parent.name for p, _ in MANIFESTS})


def _ids(items):
    return [f"{p.parent.name}/{p.name}" for p, _ in items]


def _manifest(rel: str) -> dict:
    return next(d for p, d in MANIFESTS if p.relative_to(REPO / "deploy").as_posix() == rel)


def _ray_containers(doc):
    """(role, container) for the Ray containers: head and worker groups (not the submitter)."""
    for role, tpl in pod_templates(doc):
        if role != "submitter":
            yield role, tpl["spec"]["containers"][0]


def _all_containers(doc):
    """(role, container) for every container Kubernetes will run, autoscaler sidecar included."""
    for role, tpl in pod_templates(doc):
        for c in tpl["spec"]["containers"]:
            yield role, c
    if (sidecar := autoscaler_container(doc)) is not None:
        yield "autoscaler", sidecar


def _groups(doc) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster_spec(doc)["workerGroupSpecs"]}


def _custom_resources(group: dict) -> dict[str, int]:
    """Parse rayStartParams.resources exactly as Ray's KubeRay autoscaler does: drop the outer
    quotes, drop the backslash escapes, json-load, integer amounts only."""
    text = group["rayStartParams"].get("resources")
    if text is None:
        return {}
    parsed = json.loads(text[1:-1].replace("\\", ""))
    assert all(isinstance(v, int) for v in parsed.values()), f"{text}: amounts must be integers"
    return parsed


def _cpu(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod_capacity(group: dict) -> dict[str, float]:
    """Ray resources one pod of the group offers (what KubeRay passes to `ray start`)."""
    params, limits = group["rayStartParams"], group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cap = {"CPU": _cpu(params.get("num-cpus", limits["cpu"])),
           "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    cap.update({k: float(v) for k, v in _custom_resources(group).items()})
    return cap


def _entrypoint(doc) -> tuple[str, list[str]]:
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "treegrpo_ray.run", "--config"], argv
    assert argv[4].startswith("configs/") and argv[4].endswith(".yaml"), argv[4]
    return argv[4], argv[5:]


def _pool_demands(cfg) -> dict[str, tuple[int, object]]:
    """pool name -> (actor / worker count, ResourcesConfig of each)."""
    return {"sampler": (cfg.pools.samplers, cfg.pools.sampler),
            "reward": (cfg.pools.rewards, cfg.pools.reward),
            "learner": (cfg.learner.workers, cfg.learner.resources)}


def _assert_config_fits(cfg, doc, where: str) -> None:
    groups = _groups(doc)
    for pool, (count, res) in _pool_demands(cfg).items():
        group = groups[pool]
        declared = _custom_resources(group)
        for name in res.resources:
            assert name in declared, f"{where}: pool {pool} asks for {name!r}, group {pool} declares {declared}"
        per_actor = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
        cap = _pod_capacity(group)
        for name, amount in per_actor.items():
            need, have = count * amount, group["replicas"] * cap.get(name, 0.0)
            assert need <= have + 1e-9, (f"{where}: {count} x {pool} need {need} {name}, "
                                         f"{group['replicas']} pods of group {pool} offer {have}")
        labels = group.get("labels", {})
        for key, value in res.label_selector.items():
            assert labels.get(key) == value, f"{where}: {pool} selects {key}={value}, group has {labels}"


# ----------------------------------------------------------------------------- schema

def test_every_size_has_a_rayjob_and_a_raycluster():
    assert SIZES == ["sd35m-8gpu", "smoke"]
    for size in SIZES:
        kinds = sorted(d["kind"] for p, d in MANIFESTS if p.parent.name == size)
        assert kinds == ["RayCluster", "RayJob"], (size, kinds)


def _validator(kind: str) -> jsonschema.Draft7Validator:
    name = {"RayJob": "rayjob_v1.json", "RayCluster": "raycluster_v1.json"}[kind]
    return jsonschema.Draft7Validator(json.loads((SCHEMA_DIR / name).read_text()))


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_manifest_validates_against_kuberay_schema(path, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:160]}"
              for e in _validator(doc["kind"]).iter_errors(doc)]
    assert not errors, "\n".join(errors)


def test_schema_rejects_what_it_should():
    # The validation above means something only if the schema is strict: an unknown field and a
    # wrong type in a worker group must both fail.
    validator = _validator("RayJob")
    bad_key = copy.deepcopy(_manifest("smoke/rayjob.yaml"))
    bad_key["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["gpus"] = 1
    bad_type = copy.deepcopy(_manifest("smoke/rayjob.yaml"))
    bad_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "1"
    assert not validator.is_valid(bad_key)
    assert not validator.is_valid(bad_type)


# ----------------------------------------------------------------------------- RayJob and config

@pytest.mark.parametrize("path,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_lifecycle(path, doc):
    spec = doc["spec"]
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("path,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_a_preempted_job_checkpoints_in_its_grace_period_and_resumes(path, doc):
    # SIGTERM -> the driver (on the head) finishes the update in flight and checkpoints within
    # checkpoint.preempt_grace_s; Kubernetes waits terminationGracePeriodSeconds before SIGKILL;
    # a resubmitted job continues the same run (resume=auto, a fixed run name)
    config, overrides = _entrypoint(doc)
    cfg = load_config(REPO / config, overrides)
    grace = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert cfg.checkpoint.preempt_grace_s < grace
    assert cfg.checkpoint.resume == "auto" and cfg.tracking.run_name


@pytest.mark.parametrize("path,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_entrypoint_config_loads_and_fits_the_groups(path, doc):
    config, overrides = _entrypoint(doc)
    assert (REPO / config).is_file(), f"{path.name} runs {config}, which does not exist"
    cfg = load_config(REPO / config, overrides)  # also applies the config's own invariants
    _assert_config_fits(cfg, doc, f"{path.parent.name}/{path.name}")


def test_paper_setting_is_4_sampler_2_reward_2_learner_gpus():
    groups = _groups(_manifest("sd35m-8gpu/rayjob.yaml"))
    gpus = {name: g["replicas"] * _pod_capacity(g)["GPU"] for name, g in groups.items()}
    assert gpus == {"sampler": 4, "reward": 2, "learner": 2}


def test_every_gpu_config_fits_the_paper_cluster():
    doc = _manifest("sd35m-8gpu/rayjob.yaml")
    configs = sorted((REPO / "configs").glob("sd35m_*.yaml"))
    assert configs, "configs/sd35m_*.yaml missing: the 8-GPU manifest has no config to run"
    for path in configs:
        _assert_config_fits(load_config(path), doc, path.name)


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_worker_groups_are_the_pools_and_pin_them(path, doc):
    groups = _groups(doc)
    assert sorted(groups) == sorted(POOLS)
    for name, group in groups.items():
        # Each group declares exactly its own slot, so no pool can land on another pool's pods.
        assert set(_custom_resources(group)) == {f"{name}_slot"}, (name, group["rayStartParams"])


@pytest.mark.parametrize("size", SIZES)
def test_raycluster_has_the_rayjob_pods(size):
    job = copy.deepcopy(_manifest(f"{size}/rayjob.yaml")["spec"]["rayClusterSpec"])
    cluster = copy.deepcopy(_manifest(f"{size}/raycluster.yaml")["spec"])
    for jg, cg in zip(job["workerGroupSpecs"], cluster["workerGroupSpecs"]):
        assert cg["minReplicas"] <= jg.pop("minReplicas")
        cg.pop("minReplicas")
    assert cluster == job


# ----------------------------------------------------------------------------- cluster shape

@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_head_and_autoscaling(path, doc):
    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert spec["enableInTreeAutoscaling"] is True
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    # Token auth from a pre-created Secret: KubeRay injects RAY_AUTH_MODE/RAY_AUTH_TOKEN everywhere.
    assert spec["authOptions"] == {"mode": "token", "secretName": "treegrpo-ray-auth"}


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_images_match_the_pinned_ray(path, doc):
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == RAY_PIN
    images = {c["image"] for _, c in _all_containers(doc)}
    assert len(images) == 1, images
    m = re.fullmatch(r"[^@\s]+/treegrpo-ray:(?P<ver>[\w.]+)-ray(?P<ray>[0-9.]+)-(?P<variant>cpu|gpu)"
                     r"(@sha256:[0-9a-f]{64})?", images.pop())
    assert m, "image must be <registry>/treegrpo-ray:<version>-ray<ray>-<cpu|gpu>[@sha256:...]"
    assert (m["ver"], m["ray"]) == (PROJECT_VERSION, RAY_PIN)
    wants_gpu = any("nvidia.com/gpu" in c["resources"]["limits"] for _, c in _all_containers(doc))
    assert m["variant"] == ("gpu" if wants_gpu else "cpu")


def test_probes_are_left_to_kuberay():
    # KubeRay injects readiness and liveness probes into a Ray container only when it has none;
    # for rayVersion >= 2.53 they are HTTP checks of the node's /api/healthz (raylet + GCS).
    # A probe written here would silently replace that check, so there is none.
    for _, doc in MANIFESTS:
        assert tuple(map(int, cluster_spec(doc)["rayVersion"].split("."))) >= (2, 53, 0)
        for role, c in _ray_containers(doc):
            assert "readinessProbe" not in c and "livenessProbe" not in c, role


# ----------------------------------------------------------------------------- security

@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_security_context(path, doc):
    for role, tpl in pod_templates(doc):
        pod = tpl["spec"]
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == IMAGE_UID, role
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, role
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), role
        assert not any("hostPath" in v for v in pod.get("volumes", [])), role
        # Only the head keeps a service-account token: its autoscaler sidecar scales the groups.
        assert pod.get("automountServiceAccountToken", True) is (role == "head"), role
    for role, c in _all_containers(doc):
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False, (role, c["name"])
        assert csc["capabilities"] == {"drop": ["ALL"]}, (role, c["name"])
        assert csc["readOnlyRootFilesystem"] is True, (role, c["name"])
        assert not csc.get("privileged"), (role, c["name"])


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_writable_paths_with_a_read_only_root(path, doc):
    for role, tpl in pod_templates(doc):
        volumes = {v["name"]: v for v in tpl["spec"].get("volumes", [])}
        for c in tpl["spec"]["containers"]:
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
            assert "emptyDir" in mounts["/tmp"], role
            if role == "submitter":
                continue
            shm = mounts["/dev/shm"]["emptyDir"]
            assert shm["medium"] == "Memory", role
            store = int(_group_params(doc, role).get("object-store-memory", 0))
            assert store <= _bytes(shm["sizeLimit"]), f"{role}: object store {store} > /dev/shm"
            hf_home = re.search(r"HF_HOME=(\S+)", DOCKERFILE).group(1)
            assert hf_home in mounts, f"{role}: HF_HOME {hf_home} is not a mounted volume"
    sidecar = autoscaler_container(doc)
    assert "/tmp" in {m["mountPath"] for m in sidecar["volumeMounts"]}


def _group_params(doc, role: str) -> dict:
    spec = cluster_spec(doc)
    return spec["headGroupSpec"]["rayStartParams"] if role == "head" else _groups(doc)[role]["rayStartParams"]


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_every_container_has_requests_equal_to_limits(path, doc):
    for role, c in _all_containers(doc):
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert {"cpu", "memory"} <= set(lim), (role, lim)
        assert req == lim, f"{role}: requests {req} != limits {lim} (Guaranteed QoS)"
    for role, tpl in pod_templates(doc):
        assert isinstance(tpl["spec"].get("nodeSelector"), dict), f"{role}: nodeSelector placeholder"
        if role != "submitter":
            assert isinstance(tpl["spec"].get("tolerations"), list), f"{role}: tolerations placeholder"


_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|CREDENTIAL|_URI$|_URL$", re.I)
_USERINFO = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


@pytest.mark.parametrize("path,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_no_inline_credentials(path, doc):
    for role, c in _all_containers(doc):
        for env in c.get("env", []):
            if "value" in env:
                assert not _SECRET_NAME.search(env["name"]), f"{role}: {env['name']} set inline"
                assert not _USERINFO.search(env["value"]), f"{role}: {env['name']} holds user:pass@"
        names = {e["name"] for e in c.get("env", [])}
        # MLflow credentials reach the driver (head) only; workers never see them.
        assert (role == "head") == ("MLFLOW_TRACKING_URI" in names), role
    head = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]
    mlflow = {e["name"]: e for e in head["env"] if e["name"].startswith("MLFLOW_")}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert mlflow[name]["valueFrom"]["secretKeyRef"]["name"] == "treegrpo-mlflow", name
    if doc["kind"] == "RayJob":
        text = doc["spec"]["entrypoint"]
        assert not re.search(r"mlflow_uri|token|password|secret", text, re.I), text
        assert not _USERINFO.search(text)


def test_networkpolicy_fences_every_pod():
    policy = next(d for _, d in load_manifests() if d.get("kind") == "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == selector
    for _, doc in MANIFESTS:
        for pod in as_pods(doc):
            assert selector.items() <= pod["metadata"]["labels"].items(), pod["metadata"]["name"]


# ----------------------------------------------------------------------------- image

def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"(?m)^ARG (\w+)=(\S*)$", DOCKERFILE))


def test_dockerfile_builds_on_the_pinned_ray_image():
    args = _dockerfile_args()
    assert args["RAY_VERSION"] == RAY_PIN
    assert args["RAY_VARIANT"] == "gpu"
    assert re.search(r"(?m)^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{RAY_VARIANT\}$", DOCKERFILE)
    py_min = re.search(r'requires-python = ">=3\.(\d+)"', PYPROJECT).group(1)
    assert re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"]) and int(args["PYTHON_TAG"][3:]) >= int(py_min)
    assert "pip install ./src" in DOCKERFILE  # the project with pyproject's pins, not a hand list


def test_dockerfile_runs_as_the_manifests_expect():
    users = re.findall(r"(?m)^USER (\S+)$", DOCKERFILE)
    assert users and users[-1].split(":")[0] == str(IMAGE_UID)
    workdir = re.findall(r"(?m)^WORKDIR (\S+)$", DOCKERFILE)[-1]
    for _, doc in MANIFESTS:
        for role, c in _ray_containers(doc):
            assert c["workingDir"] == workdir, role  # where the entrypoint's configs/ lives
    assert re.search(r"(?m)^COPY treegrpo_ray/configs \./configs$", DOCKERFILE)


def test_dockerfile_and_context_hold_no_secrets_or_weights():
    for name in re.findall(r"(?m)^(?:ENV|ARG)\s+(\w+)", DOCKERFILE) + re.findall(r"(?m)^\s+(\w+)=", DOCKERFILE):
        assert not re.search(r"TOKEN|PASSWORD|SECRET|API_?KEY|CREDENTIAL", name, re.I), name
    assert not re.search(r"(?m)^ADD\s", DOCKERFILE), "use COPY; ADD fetches URLs and unpacks archives"
    lines = [l for l in (REPO / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*", ".dockerignore must be an allowlist"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    copied = set(re.findall(r"(?m)^COPY (?:--chown=\S+ )?(.+) \S+$", DOCKERFILE))
    sources = {s for group in copied for s in group.split()}
    # every copied path is allowed (itself or under an allowed folder), every allowed path is copied
    assert all(any(s == a or s.startswith(a + "/") for a in allowed) for s in sources) and allowed <= sources, \
        (sources, allowed)
    for src in sources:
        assert (REPO / src).exists(), f"the Dockerfile copies {src}, which is missing"
    excluded = [l[len("**/*"):] for l in lines if l.startswith("**/*.")]
    dropped = [p for p in (REPO / "treegrpo_ray").rglob("*") if p.suffix in excluded]
    assert not dropped, f".dockerignore would leave these package files out of the image: {dropped}"


def test_render_pods_sees_every_pod():
    pods = as_pods(_manifest("sd35m-8gpu/rayjob.yaml"))
    assert [p["metadata"]["name"].rsplit("-", 1)[1] for p in pods] == ["head", *POOLS, "submitter"]
    assert [c["name"] for c in pods[0]["spec"]["containers"]] == ["ray-head", "autoscaler"]
