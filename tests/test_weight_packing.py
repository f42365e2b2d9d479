"""Weights travel through the object store as numpy (zero-copy, read-only); packing is exact."""
import torch

from treegrpo_ray.actors.weight_store import pack_state, unpack_state


def test_pack_roundtrip_exact_for_all_dtypes():
    state = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16),
             "f16": torch.randn(2, 2).half(), "i64": torch.arange(3)}
    back = unpack_state(pack_state(state))
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)

