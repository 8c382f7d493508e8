"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping
(Andrew et al. 2021), as the server's aggregation of the clients' adapter updates.

Each client's update is its uploaded adapters minus the round's global adapters, Δ_k. It is clipped to
global L2 norm C (over every adapter of the client at once). The server releases

    Σ_k w_k clip(Δ_k) + N(0, (z_Δ · C · w_max)² I),   divided by the expected total weight q · W,

and adds it to the global adapters. w_k is the client's example count (today's FedAvg weight, which the
server already knows), W the sum over all clients, w_max the largest client's, q = clients_per_round /
num_clients. One client changes the sum by at most w_max · C, so the noise is z_Δ times that
sensitivity: a Gaussian mechanism with noise multiplier z_Δ, subsampled with probability q, each round
(`accountant.py`). With z = 0 and C = inf, every client reporting and q = 1, this is today's weighted
mean.

Adaptive clipping also releases the count of clients whose update was within C, plus N(0, σ_b²), and
moves C geometrically towards the `target_quantile` of the update norms: C ← C · exp(-η (b̄ − γ)). The
two releases together are one Gaussian mechanism with multiplier z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2)
(Andrew et al., Theorem 1); the config's `noise_multiplier` is that z, so the update sum gets
z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2), which needs 2σ_b > z.

FedNano's Fisher merge, θ = Σ w F θ_k / Σ w F, is prev + A / B with A = Σ_k w_k F_k ⊙ Δ_k and
B = Σ_k w_k F_k (F floored, as today). Under DP both sums are released. Each client's Δ_k is clipped to
C and its floored Fisher to `fisher_clip_norm` C_F, so ‖F_k ⊙ Δ_k‖ ≤ ‖F_k‖_∞ ‖Δ_k‖ ≤ C_F · C: one client
moves A by at most w_max C C_F and B by at most w_max C_F. Scaled by those sensitivities, a client moves
the pair (A, B) by at most √2 in L2; noise of √2 · z_Δ times each sensitivity on each sum is therefore one
Gaussian mechanism with multiplier z_Δ: the accountant's ε covers both releases. The noised B is clamped
below at max(floor · q W, 3 noise stds) before dividing (post-processing, no privacy cost). With z = 0,
C = C_F = inf, every client reporting and q = 1, this is today's Fisher merge.

The noise key is a pure function of (seed, round): a resumed run adds the same noise.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.privacy import accountant
from fednano_jax.streams import Purpose, generator

STATE = "dp"  # its key in the server state


@dataclasses.dataclass(frozen=True)
class DpSettings:
    """What a run's DP aggregation needs, fixed when it starts (static under jit)."""

    noise_multiplier: float  # z: the whole mechanism's, what the accountant composes
    sampling_probability: float  # q
    clip_norm: float  # C at the start (the fixed C without adaptive clipping)
    delta: float
    expected_weight: float  # q · W
    max_weight: float  # w_max
    expected_clients: float  # q · N
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_stddev: float = 0.0  # σ_b
    accountant: str = "rdp"
    fisher_clip_norm: float = 1.0  # C_F: FedNano's floored Fisher, per client

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ: the update sum's share of z (all of it without adaptive clipping)."""
        if not self.adaptive or self.noise_multiplier == 0:
            return self.noise_multiplier
        return (self.noise_multiplier ** -2 - (2 * self.count_stddev) ** -2) ** -0.5

    def epsilon(self, rounds: int) -> float:
        return accountant.epsilon(self.noise_multiplier, self.sampling_probability, rounds, self.delta,
                                  self.accountant)


def settings(fed, client_sizes) -> DpSettings | None:
    """fed.dp as DpSettings (None when off); `fed.dp.target_epsilon` > 0 solves z over fed.rounds."""
    dp = fed.get("dp")
    if dp is None or not dp.get("enabled", False):
        return None
    sizes = np.asarray(client_sizes, np.float64)
    cohort = fed.clients_per_round or fed.num_clients
    q = cohort / fed.num_clients
    z = dp.noise_multiplier
    if dp.get("target_epsilon", 0.0) > 0:
        z = accountant.noise_for_epsilon(dp.target_epsilon, q, fed.rounds, dp.delta, dp.get("accountant", "rdp"))
    count_stddev = dp.get("count_stddev", 0.0) or cohort / 20  # Andrew et al.'s default
    return DpSettings(noise_multiplier=float(z), sampling_probability=q, clip_norm=float(dp.clip_norm),
                      delta=float(dp.delta), expected_weight=float(q * sizes.sum()), max_weight=float(sizes.max()),
                      expected_clients=float(q * fed.num_clients), adaptive=bool(dp.get("adaptive", False)),
                      target_quantile=float(dp.get("target_quantile", 0.5)),
                      clip_learning_rate=float(dp.get("clip_learning_rate", 0.2)), count_stddev=float(count_stddev),
                      accountant=dp.get("accountant", "rdp"), fisher_clip_norm=float(dp.get("fisher_clip_norm", 1.0)))


def init_state(dp: DpSettings | None, server_state: dict) -> dict:
    if dp is None:
        return server_state
    return {**server_state, STATE: {"clip_norm": np.float32(dp.clip_norm)}}


def noise_key(seed: int, round_index: int) -> jax.Array:
    return jax.random.key(int(generator(seed, Purpose.DP_NOISE, round_index).integers(2**31)))


def update_norms(deltas) -> jax.Array:
    """[K] global L2 norm of each client's update, over every leaf."""
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
               for x in jax.tree.leaves(deltas)]
    return jnp.sqrt(sum(squares))


def clip(deltas, clip_norm):
    """-> (deltas scaled to global norm at most clip_norm, their norms before clipping [K])."""
    norms = update_norms(deltas)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))
    return jax.tree.map(lambda x: x * scale.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), deltas), norms


def _gaussian_like(key, tree, std):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)])


def _weighted_sum(weights, tree):
    return jax.tree.map(lambda d: jnp.tensordot(weights, d.astype(jnp.float32), axes=1), tree)


def _noised(dp: DpSettings, key, tree, sensitivity):
    """`tree` plus Gaussian noise of z_Δ · sensitivity (nothing without noise: C may be inf, and inf * 0 is nan)."""
    if dp.noise_multiplier == 0:
        return tree
    noise = _gaussian_like(key, tree, dp.update_noise_multiplier * sensitivity)
    return jax.tree.map(lambda s, n: s + n, tree, noise)


def _client_deltas(uploaded_adapters, old, used):
    return jax.tree.map(lambda up, g: jnp.where(used.reshape((-1,) + (1,) * g.ndim), up - g[None], 0.0),
                        uploaded_adapters, old)


def private_update(dp: DpSettings, server_state: dict, uploaded_adapters, weights: jax.Array, key: jax.Array,
                   fishers=None, fisher_floor: float = 1e-6) -> dict:
    """The server state with its adapters moved by the noised mean of clipped updates (with `fishers`, by
    the noised Fisher merge of them), and C adapted. `weights` [K]: example counts, zero for a client that
    is not used (its upload is zeroed)."""
    old = server_state["adapters"]
    clip_norm = server_state[STATE]["clip_norm"]
    used = weights > 0
    clipped, norms = clip(_client_deltas(uploaded_adapters, old, used), clip_norm)
    update_key, fisher_key, count_key = jax.random.split(key, 3)
    if fishers is None:
        total = _noised(dp, update_key, _weighted_sum(weights, clipped), clip_norm * dp.max_weight)
        step = jax.tree.map(lambda s: s / dp.expected_weight, total)
    else:
        step = _private_fisher_step(dp, clipped, fishers, weights, clip_norm, (update_key, fisher_key), fisher_floor)
    new = jax.tree.map(lambda g, s: (g + s).astype(g.dtype), old, step)
    state = {**server_state, "adapters": new}
    if dp.adaptive:
        within = jnp.sum(used & (norms <= clip_norm)) + dp.count_stddev * jax.random.normal(count_key)
        fraction = within / dp.expected_clients
        state[STATE] = {"clip_norm": (clip_norm * jnp.exp(-dp.clip_learning_rate * (fraction - dp.target_quantile))
                                      ).astype(jnp.float32)}
    return state


def _private_fisher_step(dp: DpSettings, clipped, fishers, weights, clip_norm, keys, fisher_floor):
    """A / B of the module docstring: both sums clipped, noised with √2 z_Δ times their sensitivities."""
    used = (weights > 0).reshape(-1)
    floored = jax.tree.map(lambda f: jnp.where(used.reshape((-1,) + (1,) * (f.ndim - 1)),
                                               jnp.maximum(f.astype(jnp.float32), fisher_floor), 0.0), fishers)
    fisher, _ = clip(floored, dp.fisher_clip_norm)
    share = math.sqrt(2.0)  # two releases in one mechanism
    numerator = _noised(dp, keys[0], _weighted_sum(weights, jax.tree.map(jnp.multiply, fisher, clipped)),
                        share * clip_norm * dp.fisher_clip_norm * dp.max_weight)
    denominator = _noised(dp, keys[1], _weighted_sum(weights, fisher), share * dp.fisher_clip_norm * dp.max_weight)
    noise_std = dp.update_noise_multiplier * share * dp.fisher_clip_norm * dp.max_weight
    lowest = max(fisher_floor * dp.expected_weight, 3.0 * noise_std)
    return jax.tree.map(lambda a, b: a / jnp.maximum(b, lowest), numerator, denominator)


def check(dp: DpSettings | None) -> str | None:
    """Why these settings cannot run, or None."""
    if dp is None:
        return None
    if not dp.clip_norm > 0:
        return f"fed.dp.clip_norm must be positive (inf: no clipping), got {dp.clip_norm}."
    if dp.noise_multiplier < 0:
        return f"fed.dp.noise_multiplier must be non-negative, got {dp.noise_multiplier}."
    if not 0 < dp.delta < 1:
        return f"fed.dp.delta must be in (0, 1), got {dp.delta}."
    if dp.accountant == "pld" and dp.noise_multiplier < accountant.PLD_MIN_NOISE:
        return (f"The PLD accountant needs fed.dp.noise_multiplier >= {accountant.PLD_MIN_NOISE} (its "
                f"discretisation grows without bound as the noise vanishes), got {dp.noise_multiplier:g}; use "
                "fed.dp.accountant='rdp'.")
    if dp.adaptive and dp.noise_multiplier > 0 and not 2 * dp.count_stddev > dp.noise_multiplier:
        return (f"fed.dp.adaptive needs 2 * count_stddev > noise_multiplier (the clipped-count query's share of "
                f"the noise); got count_stddev={dp.count_stddev:g}, noise_multiplier={dp.noise_multiplier:g}: raise "
                "fed.dp.count_stddev or lower the noise.")
    if not dp.fisher_clip_norm > 0:
        return f"fed.dp.fisher_clip_norm must be positive (inf: no clipping), got {dp.fisher_clip_norm}."
    if dp.noise_multiplier > 0 and (math.isinf(dp.clip_norm) or math.isinf(dp.fisher_clip_norm)):
        return ("fed.dp.clip_norm and fed.dp.fisher_clip_norm must be finite when fed.dp.noise_multiplier > 0 "
                "(the noise is proportional to them).")
    if dp.adaptive and math.isinf(dp.clip_norm):
        return "fed.dp.adaptive needs a finite starting fed.dp.clip_norm."
    return None
