"""Runs started together in one output folder share its MLflow store without racing on creating it,
and each gets a run folder of its own."""
import multiprocessing as mp

from treegrpo_ray.tracking import artifact_location, tracking_uri

N = 4


def _start(out_dir: str, barrier, results) -> None:
    from treegrpo_ray.tracking import Tracker
    uri = tracking_uri("", out_dir)
    barrier.wait()  # every process creates the (not yet existing) store at the same moment
    try:
        t = Tracker(uri, "treegrpo", run_name="r", artifact_location=artifact_location(uri))
        t.log({"x": 1.0}, step=0)
        t.end()
        results.put(("ok", t.run_id))
    except Exception as e:  # report it: a dead child would only show as a missing result
        results.put(("error", f"{type(e).__name__}: {e}"))


def test_runs_started_together_in_one_folder_share_one_store(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(N), ctx.Queue()
    procs = [ctx.Process(target=_start, args=(str(tmp_path / "outputs"), barrier, results)) for _ in range(N)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [kind for kind, _ in got] == ["ok"] * N, got
    assert len({run_id for _, run_id in got}) == N  # one MLflow run each

    import mlflow
    uri = tracking_uri("", str(tmp_path / "outputs"))
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("treegrpo")
    assert len(client.search_runs([exp.experiment_id])) == N
    # the lock is a flock on the folder: no lock file, so the folder holds only what the README lists
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["mlflow.db"]  # no artifacts logged here


def _claim(root: str, barrier, results) -> None:
    from treegrpo_ray.driver import unique_run_name
    barrier.wait()
    results.put(unique_run_name(root, "tree-20261206-120000"))


def test_runs_started_in_the_same_second_get_their_own_run_folders(tmp_path):
    # a shell loop launching a sweep starts several runs in one second: the default name (variant and
    # start second) is the same for all of them, and they must not share checkpoints and exports
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(N), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path / "outputs"), barrier, results)) for _ in range(N)]
    for p in procs:
        p.start()
    names = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    base = "tree-20261206-120000"
    assert names == sorted([base, f"{base}-2", f"{base}-3", f"{base}-4"])
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == names
