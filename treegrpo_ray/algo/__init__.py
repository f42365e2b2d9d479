"""TreeGRPO math as pure torch functions: tree shape and compute accounting (`tree`), one SDE /
ODE / DDIM step with log-prob (`sde`), reward normalisation and value propagation
(`advantages`), the clipped GRPO loss and KL penalty (`loss`).

This package imports only torch and the standard library (no ray, mlflow, diffusers, config);
tests/test_layering.py enforces it.
"""
from treegrpo_ray.algo.advantages import edge_advantages, edge_advantages_recursive, node_depths, normalize_per_prompt
from treegrpo_ray.algo.loss import grpo_clip_loss, kl_to_reference
from treegrpo_ray.algo.sde import (SDEStep, ddim_step_with_logprob, flow_ode_step, flow_sde_step,
                                   gaussian_log_prob)
from treegrpo_ray.algo.tree import (TreeShape, build_tree, choose_window, count_nfe, count_nfe_flat, flat_train_count,
                                   flat_trained_steps)

__all__ = [
    "SDEStep", "TreeShape", "build_tree", "choose_window", "count_nfe", "count_nfe_flat",
    "ddim_step_with_logprob", "edge_advantages", "edge_advantages_recursive", "flat_train_count", "flat_trained_steps",
    "flow_ode_step", "flow_sde_step", "gaussian_log_prob", "grpo_clip_loss", "kl_to_reference",
    "node_depths", "normalize_per_prompt",
]
