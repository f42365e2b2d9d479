"""A real multi-node Ray cluster on one machine: a head plus one node per pool group, each its own
`ray start --block` (raylet, object store, agents) on 127.0.0.1 with its own ports and worker-port
range, carrying the `<pool>_slot` resources deploy/ gives that group, token auth on as KubeRay sets
it (RAY_AUTH_MODE=token and one RAY_AUTH_TOKEN for every process). Nodes are process groups we
started: `kill` SIGKILLs exactly one of them (raylet, agents and its workers, a node lost), `add`
starts a replacement, `down` ends exactly what we started (never `ray stop`, which ends every Ray
instance of the machine).

    python -m treegrpo_ray.loopback up [--config NAME] [key=value ...]   # blocks; Ctrl-C tears down
    python -m treegrpo_ray.loopback kill sampler | add sampler | down     # from another shell

`up` prints the environment a driver needs and the overrides that pin each pool to its node, e.g.
`RAY_ADDRESS=127.0.0.1:6xxxx RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... python -m treegrpo_ray.run
pools.sampler.resources.sampler_slot=1 ...`. tests/test_cluster.py uses the same class as a fixture.
No ray import here: the cluster is processes, and this module is usable before any Ray client is.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE = "loopback.json"
POOLS = ("sampler", "reward", "learner")
SLOT = {p: f"{p}_slot" for p in POOLS}  # the custom resource deploy/ gives each worker group


@dataclass(frozen=True)
class NodeSpec:
    name: str
    num_cpus: int
    resources: dict[str, float] = field(default_factory=dict)
    object_store_bytes: int = 400_000_000


def _free_ports(n: int) -> list[int]:
    """n distinct ports free right now (each socket held until all are chosen), from the kernel's
    ephemeral range."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _worker_ports(width: int = 64) -> tuple[int, int]:
    """A range of `width` ports, none of which is bound right now (each node has its own), below
    the kernel's ephemeral range so that no port `_free_ports` picks can fall inside it."""
    for _ in range(200):
        lo = 10000 + secrets.randbelow(20000)
        try:
            for port in (lo, lo + width // 2, lo + width - 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return lo, lo + width - 1
    raise RuntimeError("no free worker-port range found on 127.0.0.1")


def ray_env(token: str, home: str | None = None) -> dict[str, str]:
    """The environment of every process of the cluster, the driver included (KubeRay's token auth)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    if home:
        env["HOME"] = home
    return env


class LoopbackCluster:
    """Start with `start()`, end with `down()`; `address` is what a driver's ray_address takes."""

    def __init__(self, nodes: list[NodeSpec], root: str | Path | None = None, token: str | None = None,
                 head_cpus: int = 1, private_home: bool = False):
        # short root: Ray's socket paths must stay under 108 characters
        self.root = Path(root or tempfile.mkdtemp(prefix="trg-lb-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token or secrets.token_hex(32)
        home = None
        if private_home:  # no stray ~/.ray/auth_token can interfere (tests)
            home = str(self.root / "home")
            Path(home).mkdir(exist_ok=True)
        self.env = ray_env(self.token, home)
        self.head = NodeSpec("head", head_cpus)
        self.specs = {n.name: n for n in nodes}
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = self.dashboard_port = 0
        self.generation: dict[str, int] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> "LoopbackCluster":
        self.port, self.dashboard_port, client = _free_ports(3)
        head = ["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                str(self.dashboard_port), "--ray-client-server-port", str(client), "--include-dashboard", "true"]
        try:
            self._start("head", self.head, head, timeout)
            for name, spec in self.specs.items():
                self._start(name, spec, ["--address", self.address], timeout)
        except BaseException:
            self.down()
            raise
        self._write_state()
        return self

    def add(self, name: str, timeout: float = 180) -> None:
        """Start (again) the node `name` with its spec: a replacement node with the same resources."""
        self._start(name, self.specs[name], ["--address", self.address], timeout)
        self._write_state()

    def kill(self, name: str) -> int:
        """SIGKILL node `name`: its `ray start`, raylet, agents and every worker it spawned. Returns the pgid."""
        proc = self.procs.pop(name)
        pgid = proc.pid
        _killpg(pgid, signal.SIGKILL)
        proc.wait()
        self._write_state()
        return pgid

    def down(self) -> None:
        """End every process this cluster started (its process groups), head last."""
        for name in [n for n in self.procs if n != "head"] + (["head"] if "head" in self.procs else []):
            proc = self.procs.pop(name)
            tree = _tree(proc.pid)
            _killpg(proc.pid, signal.SIGTERM, tree)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            _killpg(proc.pid, signal.SIGKILL, tree)  # agents that ignore SIGTERM, workers left behind
            proc.wait()
        (self.root / STATE).unlink(missing_ok=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.down()

    # -- internals ------------------------------------------------------------------------------------
    def _start(self, name: str, spec: NodeSpec, extra: list[str], timeout: float) -> None:
        lo, hi = _worker_ports()
        used = {int(v) for v in extra if v.isdigit()}
        node_mgr, obj_mgr, agent, agent_grpc, env_agent, metrics = [p for p in _free_ports(12) if p not in used][:6]
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", *extra,
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(spec.num_cpus), "--num-gpus", "0",
               "--resources", json.dumps(spec.resources), "--object-store-memory", str(spec.object_store_bytes),
               "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
               "--min-worker-port", str(lo), "--max-worker-port", str(hi),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(env_agent), "--metrics-export-port", str(metrics),
               "--temp-dir", str(self.root / "ray"), "--disable-usage-stats"]
        self.generation[name] = self.generation.get(name, 0) + 1
        log = self.root / f"{name}-{self.generation[name]}.log"
        with open(log, "w") as out:  # own session: the node is one process group, killed as one
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None:
                raise RuntimeError(f"node {name}: ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {name} not up after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def _write_state(self) -> None:
        state = {"address": self.address, "token": self.token, "root": str(self.root), "owner": os.getpid(),
                 "dashboard": f"http://127.0.0.1:{self.dashboard_port}",
                 "nodes": {n: {"pgid": p.pid, **asdict(self.specs.get(n, self.head))} for n, p in self.procs.items()}}
        (self.root / STATE).write_text(json.dumps(state, indent=2))


def _tree(pid: int) -> list:
    """The node's processes: its `ray start` and every descendant (Ray's workers start sessions of
    their own, so the process group alone would leave them running, as a lost machine does not)."""
    import psutil
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _killpg(pgid: int, sig: int, procs: list | None = None) -> None:
    """Signal node `pgid`: its process group and `procs` (default: its process tree now)."""
    import psutil
    procs = _tree(pgid) if procs is None else procs
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


# ----------------------------------------------------------------------------- from a config

def nodes_for(cfg) -> list[NodeSpec]:
    """One node per pool group, sized for the config's pool (CPUs x actors) and carrying the pool's
    custom resources times its actor count; a pool that asks for none still gets its slot, which
    `pin_overrides` then asks for."""
    groups = (("sampler", cfg.pools.samplers, cfg.pools.sampler), ("reward", cfg.pools.rewards, cfg.pools.reward),
              ("learner", cfg.learner.workers, cfg.learner.resources))
    out = []
    for name, count, r in groups:
        resources = {k: v * count for k, v in (r.resources or {SLOT[name]: 1.0}).items()}
        out.append(NodeSpec(name, max(1, int(round(r.num_cpus * count))), resources))
    return out


def pin_overrides(cfg) -> list[str]:
    """key=value overrides that pin each pool to its node group (those the config does not already pin)."""
    keys = {"sampler": ("pools.sampler", cfg.pools.sampler), "reward": ("pools.reward", cfg.pools.reward),
            "learner": ("learner.resources", cfg.learner.resources)}
    return [f"{key}.resources.{SLOT[name]}=1" for name, (key, r) in keys.items() if not r.resources]


# ----------------------------------------------------------------------------- CLI

def _load_state(root: str) -> dict:
    path = Path(root) / STATE
    if not path.exists():
        raise SystemExit(f"no loopback cluster at {root} ({STATE} missing): start one with "
                         "`python -m treegrpo_ray.loopback up`")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m treegrpo_ray.loopback", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "kill", "add", "down"])
    p.add_argument("node", nargs="?", help="kill/add: sampler | reward | learner")
    p.add_argument("--config", default=None, help="size the nodes for this run config (default: the miniature)")
    p.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "treegrpo-loopback"),
                   help="the cluster's folder (logs, Ray's temp dir, loopback.json)")
    p.add_argument("overrides", nargs="*", default=[])
    args = p.parse_args(argv)
    if args.action == "up":
        return _up(args)
    state = _load_state(args.root)
    if args.action == "kill":
        pgid = state["nodes"][args.node]["pgid"]
        _killpg(pgid, signal.SIGKILL)
        print(f"killed node {args.node} (process group {pgid})")
        return 0
    if args.action == "add":  # the `up` process owns the cluster: ask it to start the node
        (Path(args.root) / f"add-{args.node}").touch()
        print(f"asked the cluster at {args.root} to start a replacement {args.node} node")
        return 0
    os.kill(state["owner"], signal.SIGTERM)  # the `up` process ends its nodes
    print(f"asked the cluster at {args.root} to end its nodes")
    return 0


def _up(args) -> int:
    from treegrpo_ray.config import load_config
    cfg = load_config(args.config, args.overrides)
    cluster = LoopbackCluster(nodes_for(cfg), root=args.root)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with cluster:
        env = f"RAY_ADDRESS={cluster.address} RAY_AUTH_MODE=token RAY_AUTH_TOKEN={cluster.token}"
        print(f"loopback cluster up: head + {', '.join(f'{n.name} ({n.num_cpus} CPU, {n.resources})' for n in cluster.specs.values())}")
        print(f"dashboard http://127.0.0.1:{cluster.dashboard_port} | logs and state in {cluster.root}")
        print(f"run on it:\n  {env} python -m treegrpo_ray.run "
              f"{'--config ' + args.config + ' ' if args.config else ''}{' '.join(args.overrides + pin_overrides(cfg))}")
        print(f"lose a node: python -m treegrpo_ray.loopback kill sampler --root {cluster.root}; "
              f"replace it: ... add sampler; Ctrl-C here ends every node", flush=True)
        try:
            while not stop and "head" in cluster.procs:
                for name, proc in list(cluster.procs.items()):
                    if proc.poll() is not None:
                        cluster.procs.pop(name)
                        print(f"node {name} is gone (exit {proc.returncode})", flush=True)
                for flag in cluster.root.glob("add-*"):
                    flag.unlink()
                    if flag.name[4:] in cluster.specs and flag.name[4:] not in cluster.procs:
                        cluster.add(flag.name[4:])
                        print(f"started a replacement {flag.name[4:]} node", flush=True)
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    print("loopback cluster down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
