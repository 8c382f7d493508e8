"""What the ServerApp and the ClientApps say to each other over Flower (`serving/flower_apps.py`), both ends.

A round's message is Flower's train message in its fit layout (`fitins.parameters`, an ArrayRecord of the trees'
leaves, and `fitins.config`, the header and the trees' skeletons), so that Flower's SecAgg+ (`secaggplus_mod`, which
reads a fit reply) can wrap it unchanged. The reply is the fit reply: the upload and the client state as arrays, or,
under secure aggregation, the client's contribution as integer limbs that SecAgg+ masks (below); the loss and the
traffic as metrics.

SecAgg+ as an exact adder. Flower's SecAgg+ quantises floats stochastically into [-c, c] with 2^q levels and adds
them modulo 2^32. Fed integers with c = 2^(q-1), its quantisation is the identity, so it adds integers exactly. The
client writes its contribution in the simulation's fixed point (`privacy/secagg.quantise`: 40 fraction bits in
Z_{2^64}) and splits each entry into base-2^b digits that SecAgg+ adds; the server recombines the digit sums into the
Z_{2^64} sum and reads it back (`dequantise`). So a deployed secure round quantises exactly as the simulation's model
of the protocol does, at ceil(64 / b) times the bytes of one int32 vector.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fednano_jax.privacy.secagg import dequantise, quantise
from fednano_jax.serving.client_processes import _flat, _rebuilt, _skeleton

TREES = "trees"  # the config entry holding the trees' skeletons and leaf names
MODULUS_BITS = 32  # SecAgg+'s ring, Z_{2^32}


def _leaves(trees: dict) -> tuple[list[np.ndarray], str]:
    """Named trees -> (their leaves in a fixed order, the JSON that rebuilds them)."""
    named: dict[str, np.ndarray] = {}
    for name, tree in trees.items():
        _flat(name, tree, named)
    order = sorted(named)
    layout = json.dumps({"skeletons": {name: _skeleton(tree) for name, tree in trees.items()}, "order": order,
                         "shapes": [list(named[name].shape) for name in order]})  # Flower's records lose 0-d shapes
    return [np.ascontiguousarray(named[name]) for name in order], layout


def _trees(leaves: list[np.ndarray], layout: str) -> dict:
    described = json.loads(layout)
    named = {name: leaf.reshape(shape) for name, leaf, shape in zip(described["order"], leaves, described["shapes"],
                                                                     strict=True)}
    return {name: _rebuilt(name, skeleton, named) for name, skeleton in described["skeletons"].items()}


def round_content(trees: dict, header: dict[str, str]):
    """The trees (nested dicts of arrays, or None) and header fields as a train message's content (fit layout)."""
    leaves, layout = _leaves(trees)
    return compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(leaves), {**header, TREES: layout}), True)


def round_of(content) -> tuple[dict, dict[str, str]]:
    """-> (trees, header) of a `round_content`."""
    fitins = compat.recorddict_to_fitins(content, True)
    header = {key: value for key, value in fitins.config.items() if key != TREES}
    return _trees(parameters_to_ndarrays(fitins.parameters), str(fitins.config[TREES])), header


def reply_content(trees: dict, metrics: dict):
    """A client's reply (fit layout): its trees and scalar metrics (numbers, or strings such as an error)."""
    leaves, layout = _leaves(trees)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(leaves), 1, {**metrics, TREES: layout})
    return compat.fitres_to_recorddict(fitres, True)


def reply_of(content) -> tuple[dict, dict]:
    """-> (trees, metrics) of a `reply_content`."""
    fitres = compat.recorddict_to_fitres(content, True)
    metrics = {key: value for key, value in fitres.metrics.items() if key != TREES}
    return _trees(parameters_to_ndarrays(fitres.parameters), str(fitres.metrics[TREES])), metrics


def limb_bits(cohort: int) -> int:
    """Bits per digit such that SecAgg+ adds `cohort` clients' digits exactly: each digit, shifted by c, lies in
    [0, 2c] with 2c = 2^q levels, and the cohort's sum of them (and of the weight factor SecAgg+ adds, 2^q each)
    stays below 2^32; its quantiser works in int32, so 2^q < 2^31."""
    levels = MODULUS_BITS - 1 - math.ceil(math.log2(max(cohort, 2)))
    return levels - 1


def secagg_ranges(cohort: int) -> dict:
    """SecAggPlusWorkflow's quantisation for `limb_bits`: c = 2^(q-1), 2^q levels, so integers pass unchanged."""
    levels = limb_bits(cohort) + 1
    return {"clipping_range": float(2 ** (levels - 1)), "quantization_range": 2 ** levels,
            "modulus_range": 2 ** MODULUS_BITS}


def to_limbs(vector: np.ndarray, bits: int) -> list[np.ndarray]:
    """A contribution (float64) in the simulation's fixed point, as balanced base-2^bits digits (float64 integers in
    [-2^(bits-1), 2^(bits-1)), least significant first) whose weighted sum is the Z_{2^64} value."""
    rest = quantise(vector).view(np.int64)  # |value| < 2^62 (quantise checks), so no step below overflows
    half, mask = np.int64(1 << (bits - 1)), np.int64((1 << bits) - 1)
    digits = []
    for _ in range(math.ceil(64 / bits)):
        digit = ((rest + half) & mask) - half
        digits.append(digit.astype(np.float64))
        rest = (rest - digit) >> np.int64(bits)  # exact: rest - digit is a multiple of 2^bits
    return digits


def from_limbs(digit_sums: list[np.ndarray], bits: int) -> np.ndarray:
    """The summed digits (exact integers in float64) -> the sum of the contributions, read back from fixed point
    (the digit sums recombined modulo 2^64, as the simulation's ring adds)."""
    total = np.zeros(digit_sums[0].shape, np.uint64)
    for place, digits in enumerate(digit_sums):
        total += np.rint(digits).astype(np.int64).view(np.uint64) << np.uint64(bits * place)
    return dequantise(total)
