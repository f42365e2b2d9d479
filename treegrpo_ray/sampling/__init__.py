"""Sampling layer: grows TreeGRPO trees and the flat / mix baselines into `TreeBatch`es.
May import models/ and algo/, never ray."""
from treegrpo_ray.sampling.tree_sampler import TreeSampler

__all__ = ["TreeSampler"]
