"""List the pod templates inside the KubeRay manifests of deploy/, and write them out as plain Pods.

Scanners such as checkov check Pods, Deployments and Jobs but skip custom resources, so a RayJob
or RayCluster passes them unread. This script pulls every pod template out of every manifest
(head, each worker group, the RayJob's submitter) and writes it as a `kind: Pod` file, plus the
autoscaler sidecar KubeRay adds to the head (its settings come from `autoscalerOptions`). The
other manifests (NetworkPolicy, PersistentVolumeClaims) are copied beside them as they are:

    python deploy/render_pods.py /tmp/treegrpo-pods
    checkov -d /tmp/treegrpo-pods --framework kubernetes --skip-download

What the rendered Pods lack is what the operator adds when it builds the real ones: the
`ray start` command, the readiness/liveness probes, and the /tmp/ray log volume of the head.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Iterator

import yaml

DEPLOY = Path(__file__).resolve().parent
RAY_KINDS = ("RayJob", "RayCluster")


def load_manifests(root: Path = DEPLOY) -> list[tuple[Path, dict]]:
    """Every YAML document under `root`, as (file, document) pairs in a stable order."""
    out = []
    for path in sorted(root.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def cluster_spec(doc: dict) -> dict:
    """The RayClusterSpec of a RayJob or RayCluster."""
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(role, pod template) for the head, each worker group and, for a RayJob, the submitter."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]


def autoscaler_container(doc: dict) -> dict | None:
    """The sidecar KubeRay adds to the head when in-tree autoscaling is on (None otherwise)."""
    spec = cluster_spec(doc)
    if not spec.get("enableInTreeAutoscaling"):
        return None
    opts = spec.get("autoscalerOptions", {})
    head_image = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    container = {"name": "autoscaler", "image": opts.get("image", head_image)}
    for key in ("imagePullPolicy", "resources", "securityContext", "env", "envFrom", "volumeMounts"):
        if key in opts:
            container[key] = copy.deepcopy(opts[key])
    return container


def as_pods(doc: dict) -> list[dict]:
    """Plain Pod objects, one per pod template, named <manifest>-<role>."""
    pods = []
    for role, template in pod_templates(doc):
        spec = copy.deepcopy(template["spec"])
        if role == "head" and (sidecar := autoscaler_container(doc)) is not None:
            spec["containers"].append(sidecar)
        meta = copy.deepcopy(template.get("metadata", {}))
        meta["name"] = f"{doc['metadata']['name']}-{role}"
        meta["namespace"] = doc["metadata"].get("namespace", "default")
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
    return pods


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for path, doc in load_manifests():
        if doc.get("kind") not in RAY_KINDS:  # NetworkPolicy, PVCs: copied so scanners see them
            name = f"{path.parent.name}-{path.stem}-{doc['metadata']['name']}.yaml"
            (out / name).write_text(yaml.safe_dump(doc, sort_keys=False))
            continue
        for pod in as_pods(doc):
            name = f"{path.parent.name}-{path.stem}-{pod['metadata']['name']}.yaml"
            (out / name).write_text(yaml.safe_dump(pod, sort_keys=False))
            count += 1
    print(f"wrote {count} pods to {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python deploy/render_pods.py OUT_DIR")
    sys.exit(main(sys.argv[1]))
