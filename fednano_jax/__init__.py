"""fednano_jax: FedNano in JAX/Flax NNX. `load_pretrained` (LLaVA-1.5, LLaMA-family LLMs) and `load_minigpt4`
load real checkpoints (see fednano_jax.backbone.pretrained and fednano_jax.backbone.family.minigpt4)."""


def load_pretrained(path, dtype=None, adapter=None, seed: int = 0):
    from fednano_jax.backbone.pretrained import load_pretrained as load

    return load(path, dtype=dtype, adapter=adapter, seed=seed)


def load_minigpt4(llm, projection, vision, qformer=None, dtype=None, adapter=None, seed: int = 0):
    from fednano_jax.backbone.family.minigpt4 import load_minigpt4 as load

    return load(llm, projection, vision, qformer, dtype=dtype, adapter=adapter, seed=seed)
