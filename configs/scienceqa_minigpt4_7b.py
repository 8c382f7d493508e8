"""The paper's ScienceQA setup on MiniGPT-4 (Vicuna-7B): EVA ViT-g, Q-Former and llama_proj on the clients,
Vicuna-7B frozen on the server; K=5 clients over Dirichlet(1) topics, R=10 rounds, 1 local epoch, batch 8,
NanoAdapters of rank 64; every method of the paper.

Checkpoints (MiniGPT-4's own files; .pth files need torch, or convert them once with
`python -m fednano_jax.convert_pth FILE.pth`):
    model.path                 a Vicuna-7B Hugging Face directory
    model.minigpt4.projection  prerained_minigpt4_7b.pth (llama_proj)
    model.minigpt4.vision      eva_vit_g.pth, or a Hugging Face BLIP-2 directory
    model.minigpt4.qformer     blip2_pretrained_flant5xxl.pth ("" when vision is a BLIP-2 directory)

Run:   python -m fednano_jax.main --config=configs/scienceqa_minigpt4_7b.py --config.data.root=DIR
Stats: python -m fednano_jax.data.partition_stats --config=configs/scienceqa_minigpt4_7b.py --config.data.root=DIR
"""

import os
import runpy

from ml_collections import ConfigDict

from fednano_jax.backbone.presets import minigpt4_7b


def minigpt4_setup(config: ConfigDict) -> ConfigDict:
    """The paper's federation and evaluation (as the LLaVA-1.5 configs), with MiniGPT-4-7B as the backbone."""
    here = os.path.dirname(__file__)
    config = runpy.run_path(os.path.join(here, "scienceqa_llava15_7b.py"))["paper_setup"](config)
    config.model = minigpt4_7b(rank=64)
    config.model.family = "minigpt4"  # fednano_jax/backbone/family/minigpt4.py
    config.model.path = "~/models/vicuna-7b"
    config.model.minigpt4 = ConfigDict(dict(projection="~/models/minigpt4/prerained_minigpt4_7b.pth",
                                            vision="~/models/minigpt4/eva_vit_g.pth",
                                            qformer="~/models/minigpt4/blip2_pretrained_flant5xxl.pth"))
    return config


def get_config() -> ConfigDict:
    config = runpy.run_path(os.path.join(os.path.dirname(__file__), "scienceqa_tiny.py"))["get_config"]()
    config.name = "scienceqa_minigpt4_7b"
    return minigpt4_setup(config)
