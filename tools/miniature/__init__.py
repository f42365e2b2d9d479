"""Build tooling for the miniature (DESIGN.md §3): trains its tokenizer, text encoders, VAE, flow
model and reward from the synthetic world in `treegrpo_ray.miniature`, and writes the assets the
package ships (`treegrpo_ray/assets/miniature/`). Run from a checkout:

    python -m tools.miniature.build --out treegrpo_ray/assets/miniature --seed 0
    python -m tools.miniature.evaluate

The runtime needs none of this; it loads the built assets with `from_pretrained`.
"""
