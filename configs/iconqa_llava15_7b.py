"""The paper's IconQA setup: LLaVA-1.5-7B frozen, K=5 clients over Dirichlet(1) skills, R=10 rounds,
1 local epoch, batch 8, NanoAdapters of rank 64; every method of the paper.

Run:   python -m fednano_jax.main --config=configs/iconqa_llava15_7b.py --config.data.root=DIR
Stats: python -m fednano_jax.data.partition_stats --config=configs/iconqa_llava15_7b.py --config.data.root=DIR
"""

import os
import runpy

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    here = os.path.dirname(__file__)
    config = runpy.run_path(os.path.join(here, "iconqa_tiny.py"))["get_config"]()
    config.name = "iconqa_llava15_7b"
    return runpy.run_path(os.path.join(here, "scienceqa_llava15_7b.py"))["paper_setup"](config)
