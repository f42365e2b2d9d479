"""What the weight fingerprint (models/fingerprint.py) costs, against what it guards: loading the
same state into a model's tensors (`copy_`, what `load_broadcast_state` does per version).

States (float32, CPU): `mini-lora` and `mini-full` (the shipped miniature transformer, rank-32
LoRA on it), `sd35m-lora` (a rank-32 LoRA's shapes on SD3.5-medium: 192 tensors, 37.7 MB),
`1gb` (256 tensors of 4 MiB: the cost does not grow with tensor size), `many-small` (1,200
tensors of 1,536 floats: SD3.5-medium's full transformer has ~1,100 tensors; the cost is per tensor).

    PYTHONPATH=. python bench/bench_fingerprint.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ siblings and tools/

from bench.bench_weight_sync import miniature_states, nbytes, synthetic_states  # noqa: E402
from treegrpo_ray.models.fingerprint import digest, fingerprint  # noqa: E402


def median_s(fn, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    states = {**miniature_states(), **synthetic_states(["sd35m-lora", "1gb"]),
              "many-small": {f"t{i}": torch.randn(1536) for i in range(1200)}}
    print(f"{'state':12} {'tensors':>7} {'MB':>8} {'copy_ ms':>9} {'fingerprint ms':>15} {'+digest ms':>11} {'fp / copy_':>10}")
    for name, state in states.items():
        target = {k: torch.empty_like(v) for k, v in state.items()}

        def load():
            for k, t in target.items():
                t.copy_(state[k])
        copy_s = median_s(load)
        fp_s = median_s(lambda: fingerprint(state))
        fp = fingerprint(state)
        dig_s = median_s(lambda: digest(fp))
        print(f"{name:12} {len(state):7d} {nbytes(state) / 1e6:8.2f} {copy_s * 1e3:9.2f} {fp_s * 1e3:15.2f} "
              f"{dig_s * 1e3:11.2f} {fp_s / copy_s:10.2f}")


if __name__ == "__main__":
    main()
