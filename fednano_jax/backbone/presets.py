"""Model shapes of the paper's backbones as config sections, usable with no weights at hand.

A config file takes a preset's `model` section (and sets `model.path` to the checkpoint);
accounting, memory planning and benchmarks build abstract models from these shapes
with `jax.eval_shape`, and the checkpoint loader checks a checkpoint against them.
"""

from __future__ import annotations

from ml_collections import ConfigDict


def llava15_7b(rank: int = 64, alpha: float = 16.0) -> ConfigDict:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (576 patches, layer -2), mlp2x_gelu, Vicuna-7B."""
    return ConfigDict(dict(
        dtype="bfloat16",
        # Per decoder layer, as the plans say (docs/memory.md): without it a 5-client round was planned at
        # 144 GiB per H100; with it (and the answer-only loss) at 34 GiB.
        remat="full",
        connector="mlp2x_gelu",
        vision=dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24,
                    num_heads=16, feature_layer=-2),
        llm=dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                 rope_theta=10000.0, rms_norm_eps=1e-5),
        vocab_size=32064,  # the checkpoint's text vocabulary, <image> (id 32000) and padding included
        adapter=dict(rank=rank, alpha=alpha, image=True, text=True, client_ranks=()),
        client_layers=0,  # decoder layers each client runs after NanoEdge (model.client_layers)
    ))


def minigpt4(llm: dict, rank: int = 64, alpha: float = 16.0) -> ConfigDict:
    """MiniGPT-4 (Vision-CAIR): BLIP-2's EVA-CLIP ViT-g/14 at 224 px (39 blocks) and Q-Former (32 queries),
    llama_proj, Vicuna; its chat template."""
    return ConfigDict(dict(
        dtype="bfloat16",
        remat="full",  # per decoder layer, as the LLaVA-1.5-7B preset
        connector="linear",  # llama_proj
        prompt="minigpt4",
        vision=dict(image_size=224, patch_size=14, hidden_size=1408, intermediate_size=6144, num_layers=39,
                    num_heads=16),
        qformer=dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                     cross_attention_frequency=2, num_query_tokens=32),
        llm=llm,
        vocab_size=32000,  # Vicuna's; a loaded model embeds one more id, <image>, where the queries go
        adapter=dict(rank=rank, alpha=alpha, image=True, text=True, client_ranks=()),
        client_layers=0,  # decoder layers each client runs after NanoEdge (model.client_layers)
    ))


def minigpt4_7b(rank: int = 64, alpha: float = 16.0) -> ConfigDict:
    """MiniGPT-4 with Vicuna-7B (lmsys/vicuna-7b-v0 as MiniGPT-4 builds it; LLaMA-7B's shapes)."""
    return minigpt4(dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                         rope_theta=10000.0, rms_norm_eps=1e-6), rank, alpha)


def minigpt4_13b(rank: int = 64, alpha: float = 16.0) -> ConfigDict:
    """MiniGPT-4 with Vicuna-13B (LLaMA-13B's shapes)."""
    return minigpt4(dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40,
                         rope_theta=10000.0, rms_norm_eps=1e-6), rank, alpha)


def smollm2_135m(rank: int = 16, alpha: float = 32.0) -> ConfigDict:
    """HuggingFaceTB/SmolLM2-135M(-Instruct) as the LLM, with the small 64 px vision tower of configs/easyvqa_*."""
    return ConfigDict(dict(
        dtype="bfloat16",
        connector="mlp2x_gelu",
        vision=dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                    feature_layer=-2),
        llm=dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                 rope_theta=100000.0, rms_norm_eps=1e-5),
        vocab_size=49152,
        adapter=dict(rank=rank, alpha=alpha, image=True, text=True, client_ranks=()),
        client_layers=0,  # decoder layers each client runs after NanoEdge (model.client_layers)
    ))
