"""LLaVA-1.5-7B shapes (bf16 frozen backbone, rank-64 NanoAdapters) for memory plans and GPU benchmarks.

No weights are needed:
    python -m fednano_jax.memory_plan --config=configs/memory_llava15_7b.py      # 5 clients, batch 8, 576 + text
    python -m fednano_jax.benchmark --config=configs/memory_llava15_7b.py --clients=1 --batch=8 --mode=vmap
For a federated run, set model.path to the checkpoint (see configs/easyvqa_smollm2.py).
"""

from configs.easyvqa_tiny import get_config as tiny_config
from fednano_jax.backbone.presets import llava15_7b


def get_config():
    config = tiny_config()
    config.name = "memory_llava15_7b"
    config.model = llava15_7b()
    config.model.family = "llava"  # fednano_jax/backbone/family/llava.py
    config.model.remat = "full"  # per decoder layer; "none" keeps every activation (see memory_plan's table)
    config.fed.num_clients = 5
    config.fed.batch_size = 8
    config.mesh.backbone = "fsdp"  # only matters with mesh.model > 1: large matrices sharded over the model axis
    return config
