"""The reward kinds a config may name (`rewards.terms.N.name`); `reward_model` builds each."""
REWARD_KINDS = ("miniature", "hpsv2", "clipscore", "jpeg_compressibility", "jpeg_incompressibility")
