"""fednano_jax: FedNano in JAX/Flax NNX. `load_pretrained` loads real checkpoints (see fednano_jax.backbone.pretrained)."""


def load_pretrained(path, dtype=None, adapter=None, seed: int = 0):
    from fednano_jax.backbone.pretrained import load_pretrained as load

    return load(path, dtype=dtype, adapter=adapter, seed=seed)
