"""FedNano on easy-VQA with a small MiniGPT-4-shaped MLLM: an EVA-style ViT, a Q-Former whose 8 learned
queries read it, `llama_proj` (one linear layer) and the tiny LLaMA, in MiniGPT-4's chat template. The
backbone is pretrained on the same held-aside easy-VQA images as configs/easyvqa_tiny.py's.

Run: python -m fednano_jax.main --config=configs/easyvqa_minigpt4_tiny.py
"""

import os
import runpy

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = runpy.run_path(os.path.join(os.path.dirname(__file__), "easyvqa_tiny.py"))["get_config"]()
    config.name = "easyvqa_minigpt4_tiny"
    model = config.model
    model.family = "minigpt4"  # fednano_jax/backbone/family/minigpt4.py: its layout, pretrained here
    model.prompt = "minigpt4"  # "###Human: <Img><image></Img> {question} ###Assistant:", answers end with ###
    model.connector = "linear"  # llama_proj
    # EVA ViT layout (q/v biases, exact GELU, ln_vision); 16 patches and a class token.
    model.vision = ConfigDict(dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=128,
                                   num_layers=3, num_heads=4))
    # A_I sits on the projected query outputs: 8 image tokens per image (MiniGPT-4 has 32).
    model.qformer = ConfigDict(dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                    cross_attention_frequency=2, num_query_tokens=8))
    return config
