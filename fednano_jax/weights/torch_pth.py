"""LAVIS / MiniGPT-4 checkpoints: `torch.save` files (`eva_vit_g.pth`, `blip2_pretrained_flant5xxl.pth`,
`pretrained_minigpt4.pth`), read with torch's weights-only unpickler (no code in the file runs).

torch is needed for this path only, and is imported when a `.pth` is read.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator

import numpy as np

from fednano_jax.errors import WeightsError


def _torch():
    try:
        import torch
    except ImportError as error:
        raise WeightsError("Reading a .pth checkpoint needs PyTorch (pip install torch); convert it once to "
                           "safetensors where torch is installed, or pass a Hugging Face BLIP-2 directory.") from error
    return torch


def _state_dict(path: str) -> dict:
    """The file's state dict, memory-mapped where the file allows (tensors are read when touched)."""
    if not os.path.isfile(path):
        raise WeightsError(f"Expected a .pth checkpoint at {path!r}; no such file.")
    torch = _torch()
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) file cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file torch cannot unpickle safely: say which and why
        raise WeightsError(f"{path} is not a weights-only torch checkpoint ({type(error).__name__}: {error}).") \
            from error
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}; expected a state dict (name -> tensor), "
                           "or {'model': state dict} as LAVIS saves.")
    return {name: tensor for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}


def pth_shapes(path: str) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in _state_dict(path).items()}


def iter_pth(path: str, keep: Collection[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32-or-native numpy array) for every tensor (or those named in `keep`) of a `.pth` state
    dict, or of its `model` entry (how LAVIS saves them)."""
    torch = _torch()
    for name, tensor in _state_dict(path).items():
        if keep is not None and name not in keep:
            continue
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; fill_state casts to the model's dtype
            tensor = tensor.float()
        yield name, tensor.numpy()
