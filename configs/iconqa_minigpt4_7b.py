"""The paper's IconQA setup on MiniGPT-4 (Vicuna-7B): K=5 clients over Dirichlet(1) skills, R=10 rounds,
1 local epoch, batch 8, NanoAdapters of rank 64; every method of the paper. Checkpoints as in
configs/scienceqa_minigpt4_7b.py.

Run:   python -m fednano_jax.main --config=configs/iconqa_minigpt4_7b.py --config.data.root=DIR
Stats: python -m fednano_jax.data.partition_stats --config=configs/iconqa_minigpt4_7b.py --config.data.root=DIR
"""

import os
import runpy

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    here = os.path.dirname(__file__)
    config = runpy.run_path(os.path.join(here, "iconqa_tiny.py"))["get_config"]()
    config.name = "iconqa_minigpt4_7b"
    return runpy.run_path(os.path.join(here, "scienceqa_minigpt4_7b.py"))["minigpt4_setup"](config)
