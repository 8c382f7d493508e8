"""What crosses the split-step link: named tensors as safetensors bytes, with a small string header.

A message is one safetensors blob (no pickle: a peer can send only arrays and strings). Its metadata carries
the header: who sends it (`client`, `token`) and what it asks (`kind`). `decode` checks the framing only (a
blob that is not safetensors, or larger than the limit, is one sentence); what the tensors must be is the
server's check (`step_server.check_step`).
"""

from __future__ import annotations

import json
import struct

import numpy as np
from safetensors.numpy import load, save


class WireError(ValueError):
    """A message that cannot be read or is not what the receiver expects: the sentence is sent back."""


def encode(tensors: dict[str, np.ndarray], header: dict[str, str] | None = None) -> bytes:
    """Named arrays (C-contiguous copies are made where needed) and string header fields as one blob."""
    arrays = {name: np.asarray(value, order="C") for name, value in tensors.items()}  # 0-d stays 0-d
    return save(arrays, metadata={key: str(value) for key, value in (header or {}).items()})


def decode(blob: bytes, limit: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> (named arrays, header) of a blob of at most `limit` bytes."""
    if len(blob) > limit:
        raise WireError(f"The message is {len(blob):,} bytes, over the server's limit of {limit:,}.")
    try:
        length = struct.unpack("<Q", blob[:8])[0]
        header = json.loads(blob[8:8 + length]).get("__metadata__") or {}
        return dict(load(blob)), dict(header)
    except Exception:  # noqa: BLE001 (any framing error is the peer's, and is answered in one sentence)
        raise WireError("The message is not a safetensors blob of named tensors.") from None
