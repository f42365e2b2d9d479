"""TreeGRPO math as pure torch functions: tree shape and compute accounting (`tree`), one SDE /
ODE / DDIM step with log-prob (`sde`), leaf rewards to per-child advantages
(`advantages`), the clipped GRPO loss and KL penalty (`loss`).

This package imports only torch and the standard library (no ray, mlflow, diffusers, config);
tests/test_layering.py enforces it.
"""
from treegrpo_ray.algo.advantages import (child_advantages, combined_reward, leaf_advantages, node_depths, node_values,
                                         node_values_recursive, normalize_per_prompt)
from treegrpo_ray.algo.loss import grpo_clip_loss, kl_to_reference
from treegrpo_ray.algo.sde import (SDEStep, ddim_step_with_logprob, flow_ode_step, flow_sde_step,
                                   gaussian_log_prob)
from treegrpo_ray.algo.tree import (TreeShape, build_tree, choose_window, count_nfe, count_nfe_flat, flat_train_count,
                                   flat_trained_steps)

__all__ = [
    "SDEStep", "TreeShape", "build_tree", "child_advantages", "choose_window", "combined_reward", "count_nfe",
    "count_nfe_flat", "ddim_step_with_logprob", "flat_train_count", "flat_trained_steps", "flow_ode_step",
    "flow_sde_step", "gaussian_log_prob", "grpo_clip_loss", "kl_to_reference", "leaf_advantages", "node_depths",
    "node_values", "node_values_recursive", "normalize_per_prompt",
]
