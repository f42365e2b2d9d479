"""Model families: one class per pipeline family (SD3/SD3.5, FLUX.1, SD1.5, Qwen-Image, Wan2.1 T2V),
chosen once from the pipeline's class in `model_index.json`. See `base.Family` for the contract."""
from __future__ import annotations

from treegrpo_ray.models.families.base import Family
from treegrpo_ray.models.families.flux import FluxFamily
from treegrpo_ray.models.families.qwenimage import QwenImageFamily
from treegrpo_ray.models.families.sd3 import SD3Family
from treegrpo_ray.models.families.sd15 import SD15Family
from treegrpo_ray.models.families.wan import WanFamily

FAMILIES = (SD3Family, FluxFamily, SD15Family, QwenImageFamily, WanFamily)
SUPPORTED_PIPELINES = tuple(name for f in FAMILIES for name in f.pipeline_classes)


def family_for(pipeline_class: str) -> type:
    """The family class serving a pipeline class name; NotImplementedError names the supported ones."""
    for family in FAMILIES:
        if pipeline_class in family.pipeline_classes:
            return family
    raise NotImplementedError(f"{pipeline_class} is not a supported pipeline; supported: {', '.join(SUPPORTED_PIPELINES)}")


__all__ = ["FAMILIES", "SUPPORTED_PIPELINES", "Family", "family_for", "FluxFamily", "QwenImageFamily", "SD15Family",
           "SD3Family", "WanFamily"]
