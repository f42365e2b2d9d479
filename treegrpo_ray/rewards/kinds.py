"""The reward kinds a config may name (`rewards.terms.N.name`), and which of a term's optional
fields each takes; `reward_model` builds each (and checks it takes at least these)."""
TAKES: dict[str, tuple[str, ...]] = {
    "miniature": ("checkpoint",),
    "miniature_colour": (),
    "hpsv2": ("checkpoint", "model_name", "version"),
    "clipscore": ("checkpoint", "model_name"),
    "aesthetic": ("checkpoint", "clip_checkpoint", "model_name"),
    "pickscore": ("checkpoint", "processor"),
    "imagereward": ("checkpoint", "processor"),
    "jpeg_compressibility": (),
    "jpeg_incompressibility": (),
}
REWARD_KINDS = tuple(TAKES)
TERM_FILE_FIELDS = ("checkpoint", "clip_checkpoint", "processor")  # a term's fields that name files or directories
