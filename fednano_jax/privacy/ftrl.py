"""DP-FTRL's correlated noise (Kairouz et al. 2021; banded matrix factorisation, Choquette-Choo et al. 2023), from
jax-privacy: `matrix_factorization.banded` optimises a b-banded, column-normalised lower-triangular C for the
prefix sums of a run's R rounds, and `noise_addition.matrix_factorization_privatizer` adds C⁻¹z to the rounds'
sums, z ~ N(0, σ² I) per round.

The server's update is FedAvg's step along the noised mean, so after t rounds the adapters have moved by the
prefix sum A(x + C⁻¹z) = B(Cx + z) with B = AC⁻¹: post-processing of the release Cx + z. With cyclic cohorts each
client takes part every `cycle` ≥ b rounds, so its columns of C do not overlap and one client moves Cx by at
most √k (k: its turns, jax-privacy's min-separation count) times its bound. σ = z √k times the sensitivity
makes the whole run one Gaussian mechanism of multiplier z (`accountant.py`).

The noise of round t is a pure function of the run's key and t (the dense privatizer folds the key with the
column index), so a resumed run adds the same noise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

OPTIMIZER_STEPS = 200  # BandMF's strategy optimisation (jax-privacy's default is 100); R ≤ a few hundred here


@functools.lru_cache(maxsize=8)
def strategy_matrix(rounds: int, bands: int) -> np.ndarray:
    """C [R, R]: BandMF's b-banded, column-normalised strategy, optimised for the mean error of prefix sums."""
    from jax_privacy.matrix_factorization import banded

    with jax.ensure_compile_time_eval():  # a constant of the server program, optimised once when it is traced
        strategy = banded.optimize(rounds, bands=min(bands, rounds), max_optimizer_steps=OPTIMIZER_STEPS)
        return np.asarray(strategy.materialize(), np.float64)


@functools.lru_cache(maxsize=8)
def noising_matrix(rounds: int, bands: int) -> np.ndarray:
    """C⁻¹ [R, R]: row t mixes the first t + 1 rounds' independent noise into round t's."""
    return np.linalg.inv(strategy_matrix(rounds, bands)).astype(np.float32)


def sensitivity_scale(turns: int) -> float:
    """How far one client taking `turns` turns, each at most one unit in L2, moves Cx: √turns (columns of norm
    one that do not overlap, since bands ≤ the minimum separation)."""
    return math.sqrt(turns)


def row_norms(rounds: int, bands: int) -> np.ndarray:
    """[R] the std of round t's noise per unit of σ: ‖row t of C⁻¹‖ (what the server's post-processing is told)."""
    return np.linalg.norm(noising_matrix(rounds, bands).astype(np.float64), axis=1).astype(np.float32)


def add_correlated_noise(key: jax.Array, sums: dict, stds: dict, step, rounds: int, bands: int) -> dict:
    """`sums` with round `step`'s row of C⁻¹z on each released entry, z of std σ_e (`stds`): jax-privacy's
    matrix-factorisation privatizer, its state the round index."""
    from jax_privacy import noise_addition

    noised = dict(sums)
    matrix = noising_matrix(rounds, bands)  # numpy: jax-privacy takes a traced matrix for a streaming one
    for index, (name, std) in enumerate(sorted(stds.items())):
        privatizer = noise_addition.matrix_factorization_privatizer(matrix, stddev=std,
                                                                    prng_key=jax.random.fold_in(key, index))
        noised[name], _ = privatizer.update(sums[name], jnp.asarray(step, jnp.int32))
    return noised
