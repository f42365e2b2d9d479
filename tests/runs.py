"""The reference run the fault, preemption and cluster tests compare against: the driver in this
process on one thread (the actors' thread count), which the Ray runs equal bit for bit."""
import pytest
import torch

from treegrpo_ray.driver import run


def run_on_one_thread(cfg) -> dict:
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "")  # mlflow exports it; the next run would log to this one's store
        torch.set_num_threads(1)
        try:
            return run(cfg)
        finally:
            torch.set_num_threads(threads)
