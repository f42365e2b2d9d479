"""Runs started together in one output folder share its MLflow store without racing on creating it,
and each gets a run folder of its own."""
import multiprocessing as mp

from treegrpo_ray.tracking import artifact_location, tracking_uri

N = 4
BASE = "tree-20261206-120000"  # a default run name: the variant and the start second


def _at_barrier(job, out_dir: str, barrier, results) -> None:
    barrier.wait()  # every process starts the job at the same moment
    try:
        results.put(("ok", job(out_dir)))
    except Exception as e:  # report it: a dead child would only show as a missing result
        results.put(("error", f"{type(e).__name__}: {e}"))


def together(job, out_dir: str) -> list:
    """job(out_dir) in N spawned processes released together; their (kind, result) pairs."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(N), ctx.Queue()
    procs = [ctx.Process(target=_at_barrier, args=(job, out_dir, barrier, results)) for _ in range(N)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return got


def _open_store(out_dir: str) -> str:
    from treegrpo_ray.tracking import Tracker
    uri = tracking_uri("", out_dir)  # the (not yet existing) store, created by every process at once
    t = Tracker(uri, "treegrpo", run_name="r", artifact_location=artifact_location(uri))
    t.log({"x": 1.0}, step=0)
    t.end()
    return t.run_id


def _claim_name(out_dir: str) -> str:
    from treegrpo_ray.run_folder import unique_run_name
    return unique_run_name(out_dir, BASE)


def test_runs_started_together_in_one_folder_share_one_store(tmp_path):
    got = together(_open_store, str(tmp_path / "outputs"))
    assert [kind for kind, _ in got] == ["ok"] * N, got
    assert len({run_id for _, run_id in got}) == N  # one MLflow run each

    import mlflow
    client = mlflow.MlflowClient(tracking_uri("", str(tmp_path / "outputs")))
    exp = client.get_experiment_by_name("treegrpo")
    assert len(client.search_runs([exp.experiment_id])) == N
    # the lock is a flock on the folder: no lock file, so the folder holds only what the README lists
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["mlflow.db"]  # no artifacts logged here


def test_runs_started_in_the_same_second_get_their_own_run_folders(tmp_path):
    # a shell loop launching a sweep starts several runs in one second: the default name is the same
    # for all of them, and they must not share checkpoints and exports
    got = together(_claim_name, str(tmp_path / "outputs"))
    assert [kind for kind, _ in got] == ["ok"] * N, got
    names = sorted(name for _, name in got)
    assert names == sorted([BASE, f"{BASE}-2", f"{BASE}-3", f"{BASE}-4"])
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == names
