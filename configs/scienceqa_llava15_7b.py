"""The paper's ScienceQA setup: LLaVA-1.5-7B frozen, K=5 clients over Dirichlet(1) topics, R=10 rounds,
1 local epoch, batch 8, NanoAdapters of rank 64; every method of the paper.

Run:   python -m fednano_jax.main --config=configs/scienceqa_llava15_7b.py --config.data.root=DIR
Stats: python -m fednano_jax.data.partition_stats --config=configs/scienceqa_llava15_7b.py --config.data.root=DIR
"""

import os
import runpy

from ml_collections import ConfigDict

from fednano_jax.backbone.presets import llava15_7b


def paper_setup(config: ConfigDict) -> ConfigDict:
    """The paper's model, federation and evaluation on a tiny config's data section."""
    config.model = llava15_7b(rank=64)
    config.model.family = "llava"  # fednano_jax/backbone/family/llava.py
    config.model.path = "~/models/llava-1.5-7b-hf"  # a llava-hf checkpoint directory
    config.data.pretrain_examples = 0  # LLaVA is already aligned: nothing held aside
    config.data.train_examples = 0  # the whole official train split
    config.data.test_examples = 0  # the whole official val and test splits
    config.data.stream_images = True  # the image table stays in host memory; each step fetches its images
    fed = config.fed
    fed.methods = ("centralized", "locft", "fedavg", "fedprox", "feddpa_f", "fednano", "fednano_ef")
    fed.num_clients, fed.rounds, fed.local_epochs, fed.batch_size = 5, 10, 1, 8
    fed.learning_rate = 2e-4
    # One lane per client, as memory_plan plans it: packed lanes are fewer, so the plan bounds them too.
    fed.pack_clients = False
    config.eval.batch_size = 16
    config.eval.max_new_tokens = 8
    return config


def get_config() -> ConfigDict:
    config = runpy.run_path(os.path.join(os.path.dirname(__file__), "scienceqa_tiny.py"))["get_config"]()
    config.name = "scienceqa_llava15_7b"
    return paper_setup(config)
