"""Client-level differential privacy as an aggregator over the methods' sums (`federated/aggregation.py`):
DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping (Andrew et al. 2021), for any method that
declares how its contribution is bounded (`Method.dp_bounds`).

A method's contribution is a dict of trees per unit of the client's weight w_k (its example count). Under
DP each *released* entry e (those `dp_bounds` names) is clipped, per client, to global L2 norm b_e
(`jax_privacy.clipping.clip_pytree`); the public entry, the unit weight (a rank mask under heterogeneous
ranks), has its sum replaced by its expectation over the sampled cohort, q · Σ_all w_k (so the server's
division does not reveal who took part). One client moves the sum of entry e by at most s_e = w_max · b_e
(b_e for an entry summed without weights, SCAFFOLD's control change). Each entry gets a share p_e of the
budget (Σ_e p_e = 1) and noise of std σ_e = z_Δ · s_e / √p_e, so the scaled vector (Σ_e / σ_e) is moved by at
most √(Σ_e p_e) / z_Δ = 1/z_Δ in L2: one Gaussian mechanism of multiplier z_Δ, which is what the accountant
composes (`accountant.py`). FedAvg: one entry, σ = z C w_max, exactly DP-FedAvg.

FedNano's Fisher merge, θ + Σ w F̃ ⊙ Δ / Σ w F̃. A Fisher's scale is a client's unbounded claim of importance,
so under DP each client rescales every leaf of its floored Fisher to mean one over the entries it holds and
writes F̂ = 1 + G (`FedNano.private_contribution`). Both sums of Eq. 1 then split into FedAvg's and a
correction: Σ w F̂ Δ = Σ w Δ + Σ w G ⊙ Δ and Σ w F̂ = Σ w + Σ w G. Released: Σ w Δ (Δ clipped to C, share
1 − f), Σ w G ⊙ Δ (G ⊙ Δ clipped to C, share f/2) and Σ w G (G clipped to √(M d), F̂'s mean square at most M,
share f/2), f = `fisher_noise_share`, M = `fisher_mean_square`, d the adapter entries; Σ w is public. With no
noise and no clipping the ratio is exactly Eq. 1 over the rescaled Fishers (Eq. 1 itself when the clients'
Fishers have equal means per leaf). The corrections' per-entry noise grows with √d while their signal grows
with the clients, so with a handful of clients the noise swamps them: the server post-processes each
correction (free under DP) with a positive-part James-Stein estimate per leaf, which drops a correction the
noise swamps and keeps one the clients resolve. A handful of clients then get DP-FedAvg's update at
1/√(1 − f) times its noise; a population gets the Fisher merge.

Adaptive clipping also releases the count of clients whose update was within C, plus N(0, σ_b²), and moves
C geometrically towards the `target_quantile` of the update norms: C ← C · exp(-η (b̄ − γ)). The two
releases are one Gaussian mechanism of multiplier z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2) (Andrew et al., Theorem 1);
the config's `noise_multiplier` is that z, so the sums get z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2), which needs 2σ_b > z.

Where the noise is added (`fed.dp.noise`): "central", by the server to the sums; "distributed", by each
client to its own clipped contribution, std σ_e / √t, so that the sum of any t or more clients' shares has
at least the central noise's variance. t is the secure-aggregation threshold (fewer survivors void the
round), or the cohort size without it (then a client that drops out lowers the noise, and ε holds only for
rounds where the whole cohort reports). With secure aggregation the server never sees an un-noised sum.
The shares are continuous Gaussians rounded to the secure sum's fixed point (2^-40), not the discrete
Gaussian a formal distributed-DP proof would use.

DP-FTRL (`fed.dp.mechanism='ftrl'`, `ftrl.py`) replaces the independent noise by BandMF's correlated noise: the
same clipping, sums, shares and post-processing, each σ_e times √k (a client's turns under cyclic cohorts), and
round t's noise is row t of C⁻¹z; its accounting is one Gaussian release for the whole run (`accountant.py`).

Noise keys are pure functions of (seed, round) and, per client, (seed, round, client id), or under DP-FTRL of the
seed and the round index kept in the DP state: a resumed run adds the same noise.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fednano_jax.privacy import accountant, ftrl
from fednano_jax.privacy.secagg import majority_threshold
from fednano_jax.settings import AUTO, CENTRAL, DISTRIBUTED, FTRL, GAUSSIAN
from fednano_jax.streams import Purpose, generator

STATE = "dp"  # its key in the server state
WEIGHT = "weight"  # the contribution entry the ratio divides by (federated/aggregation.py): public under DP
UPDATE = "delta"  # the contribution entry of the update, the ratio's numerator (federated/aggregation.py)
CORRECTION = "_correction"  # the ending of a correction's name (aggregation.CORRECTIONS)
WITHIN = "within_clip"  # the adaptive-clipping count's entry among the sums


@dataclasses.dataclass(frozen=True)
class DpSettings:
    """What a run's DP aggregation needs, fixed when it starts (static under jit)."""

    noise_multiplier: float  # z: the whole mechanism's, what the accountant composes
    participation: accountant.Participation  # who takes part in a round: q, or the cycle
    clip_norm: float  # C at the start (the fixed C without adaptive clipping)
    delta: float
    expected_weight: float  # q · Σ_all w_k: the public weights' sum the server divides by
    max_weight: float  # w_max
    expected_clients: float  # q · N
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_stddev: float = 0.0  # σ_b
    accountant: str = "rdp"
    noise: str = CENTRAL  # who adds the noise: the server, or each client its share
    noise_shares: int = 1  # t: the clients whose shares add up to the central noise (distributed noise)
    mechanism: str = GAUSSIAN  # or FTRL: BandMF's noise, correlated over the rounds
    rounds: int = 1  # the run's planned rounds: DP-FTRL's matrix size, and what its guarantee covers
    bands: int = 1  # DP-FTRL: BandMF's bands

    @property
    def sampling_probability(self) -> float:
        """q: the share of the clients in a round's cohort (expected)."""
        return self.participation.probability

    @property
    def ftrl(self) -> bool:
        return self.mechanism == FTRL

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ: the sums' share of z (all of it without adaptive clipping)."""
        if not self.adaptive or self.noise_multiplier == 0:
            return self.noise_multiplier
        return (self.noise_multiplier ** -2 - (2 * self.count_stddev) ** -2) ** -0.5

    @property
    def distributed(self) -> bool:
        return self.noise == DISTRIBUTED

    def epsilon(self, rounds: int) -> float:
        return accountant.epsilon(self.noise_multiplier, self.participation, rounds, self.delta, self.accountant,
                                  self.mechanism, max(rounds, self.rounds))


def settings(fed, client_weights) -> DpSettings | None:
    """fed.dp (settings.Fed) as DpSettings (None when off); `fed.dp.target_epsilon` > 0 solves z over fed.rounds.
    `client_weights`: every client's aggregation weight (its example count)."""
    dp = fed.dp
    if not dp.enabled:
        return None
    weights = np.asarray(client_weights, np.float64)
    cohort = fed.expected_cohort
    participation = accountant.participation_of(fed)
    z = dp.noise_multiplier
    if dp.target_epsilon > 0:
        z = accountant.noise_for_epsilon(dp.target_epsilon, participation, fed.rounds, dp.delta, dp.accountant,
                                         dp.mechanism)
    count_stddev = dp.count_stddev or cohort / 20  # Andrew et al.'s default
    secure = fed.secure_aggregation
    noise = dp.noise if dp.noise != AUTO else (DISTRIBUTED if secure else CENTRAL)
    shares = (fed.secagg_threshold or majority_threshold(cohort)) if secure else cohort
    q = participation.probability
    return DpSettings(noise_multiplier=float(z), participation=participation, clip_norm=float(dp.clip_norm),
                      delta=float(dp.delta), expected_weight=float(q * weights.sum()), max_weight=float(weights.max()),
                      expected_clients=float(q * fed.num_clients), adaptive=dp.adaptive,
                      target_quantile=float(dp.target_quantile), clip_learning_rate=float(dp.clip_learning_rate),
                      count_stddev=float(count_stddev), accountant=dp.accountant, noise=noise, noise_shares=int(shares),
                      mechanism=dp.mechanism, rounds=fed.rounds, bands=dp.ftrl_bands or participation.cycle)


def init_state(dp: DpSettings | None, server_state: dict) -> dict:
    """The server state with DP's: the clip norm, and under DP-FTRL the index of the next round's noise row."""
    if dp is None:
        return server_state
    state = {"clip_norm": np.float32(dp.clip_norm)}
    if dp.ftrl:
        state["step"] = np.int32(0)
    return {**server_state, STATE: state}


def noise_key(dp: DpSettings, seed: int, round_index: int) -> jax.Array:
    """The server's noise key of a round (central noise); under DP-FTRL the run's one key."""
    stream = generator(seed, Purpose.FTRL_NOISE) if dp.ftrl else generator(seed, Purpose.DP_NOISE, round_index)
    return jax.random.key(int(stream.integers(2**31)))


def client_noise_keys(seed: int, round_index: int, client_ids) -> jax.Array:
    """[K] the clients' own keys for their noise shares (distributed noise): the stream (seed, round, 1), never
    the server's, folded with each client's id."""
    root = jax.random.key(int(generator(seed, Purpose.DP_NOISE, round_index, 1).integers(2**31)))
    return jax.vmap(lambda client: jax.random.fold_in(root, client))(jnp.asarray(client_ids, jnp.uint32))


# ------------------------------------------------------------------ the client's side: clip, maybe noise
def clip_contribution(contribution: dict, bounds: dict) -> tuple[dict, jax.Array]:
    """One client's contribution with each released entry clipped to its bound (`bounds`: {entry: (bound,
    share)}) -> (clipped, norm of its first entry, the update, before clipping), for adaptive clipping's count."""
    from jax_privacy import clipping  # imported where DP runs: jax_privacy brings dp_accounting and scipy (~0.8 s)

    clipped, norms = dict(contribution), {}
    for name, (bound, _) in bounds.items():
        clipped[name], norms[name] = clipping.clip_pytree(contribution[name], bound)
    return clipped, norms[next(iter(bounds))]


def noise_stds(dp: DpSettings, bounds: dict, unweighted: tuple[str, ...]) -> dict | None:
    """{entry: σ_e}: z_Δ times each released entry's sensitivity over the square root of its share of the
    budget (module docstring); None without noise."""
    if dp.update_noise_multiplier == 0:
        return None
    turns = ftrl.sensitivity_scale(dp.participation.turns(dp.rounds)) if dp.ftrl else 1.0
    return {name: dp.update_noise_multiplier * turns * bound * (1.0 if name in unweighted else dp.max_weight)
            / math.sqrt(share) for name, (bound, share) in bounds.items()}


def mean_update_noise(dp: DpSettings, bounds: dict, unweighted: tuple[str, ...], step: int) -> float:
    """The std, per adapter entry, of the noise on the mean update the server applies in round `step` (0-based):
    the released update sum's σ over the public weight it is divided by (central noise; before post-processing)."""
    stds = noise_stds(dp, bounds, unweighted)
    if stds is None:
        return 0.0
    row = float(ftrl.row_norms(dp.rounds, dp.bands)[min(step, dp.rounds - 1)]) if dp.ftrl else 1.0
    return float(stds[UPDATE]) * row / dp.expected_weight


def add_noise(key: jax.Array, sums: dict, stds: dict, scale: float = 1.0) -> dict:
    """`sums` with N(0, (scale σ_e)²) on each released entry (jax_privacy's Gaussian privatizer); `stds` None:
    no noise (a bound may be inf, and inf * 0 is nan)."""
    from jax_privacy import noise_addition  # imported where DP runs (see clip_contribution)

    noised = dict(sums)
    for index, (name, std) in enumerate(sorted((stds or {}).items())):
        privatizer = noise_addition.gaussian_privatizer(stddev=std * scale, prng_key=jax.random.fold_in(key, index))
        noised[name], _ = privatizer.update(sums[name], privatizer.init(sums[name]))
    return noised


def count_noise(dp: DpSettings, key: jax.Array, scale: float = 1.0) -> jax.Array:
    return dp.count_stddev * scale * jax.random.normal(jax.random.fold_in(key, 1 << 20))


def client_share_scale(dp: DpSettings) -> float:
    """A client's share of the noise's std under distributed noise: 1 / √t."""
    return 1.0 / math.sqrt(dp.noise_shares)


# ------------------------------------------------------------------ the server's side: noise, finish, adapt C
def release(dp: DpSettings, sums: dict, stds: dict, key: jax.Array | None, state: dict) -> dict:
    """The sums as released: the server adds the noise here under central noise (the clients added theirs);
    under DP-FTRL round `state["step"]`'s correlated noise."""
    if dp.distributed or stds is None:
        return sums
    if dp.ftrl:
        return ftrl.add_correlated_noise(key, sums, stds, state["step"], dp.rounds, dp.bands)
    noised = add_noise(key, sums, stds)
    if dp.adaptive:
        noised[WITHIN] = sums[WITHIN] + count_noise(dp, key)
    return noised


def noise_in_sums(dp: DpSettings, stds: dict | None, used_count, state: dict) -> dict | None:
    """The noise std each released sum carries: the central σ_e (under DP-FTRL times the norm of the round's row
    of C⁻¹), or, under distributed noise, the shares of the `used_count` clients summed, σ_e √(used / t) (at least
    σ_e once t clients are summed)."""
    if stds is not None and dp.ftrl:
        row = jnp.asarray(ftrl.row_norms(dp.rounds, dp.bands))[state["step"]]
        return {name: std * row for name, std in stds.items()}
    if stds is None or not dp.distributed:
        return stds
    scale = jnp.sqrt(used_count.astype(jnp.float32)) * client_share_scale(dp)
    return {name: std * scale for name, std in stds.items()}


def finish(sums: dict, stds: dict | None, public_weight) -> dict:
    """Post-processing of the released sums before the method's `finalize`: the public weight replaced by its
    expectation `public_weight` (q Σ_all w_k, per entry under rank masks), and each released correction
    (FedNano's Fisher terms) shrunk toward zero, its expectation where the clients' Fishers agree, leaf by leaf."""
    finished = {name: value for name, value in sums.items() if name != WITHIN}
    finished[WEIGHT] = public_weight
    for name in [n for n in finished if n.endswith(CORRECTION)]:
        if stds is not None:
            finished[name] = jax.tree.map(lambda x: shrink_toward_zero(x, stds[name]), finished[name])
    weight_correction = WEIGHT + CORRECTION
    if weight_correction in finished:  # the denominator kept at least a tenth of its public expectation
        floor = jax.tree.map(lambda _: public_weight, finished[weight_correction]) if jax.tree_util.treedef_is_leaf(
            jax.tree.structure(public_weight)) else public_weight
        finished[weight_correction] = jax.tree.map(lambda c, w: jnp.maximum(c, -0.9 * w),
                                                   finished[weight_correction], floor)
    return finished


def shrink_toward_zero(noised: jax.Array, noise_std) -> jax.Array:
    """An empirical-Bayes (positive-part James-Stein) estimate of a leaf's entries from noised ones: scaled toward
    zero by the share of their mean square that the noise explains, with a margin of four standard errors of
    that mean square, so that a correction the noise swamps is dropped, not kept at a sliver of the noise."""
    margin = 1.0 + 4.0 * math.sqrt(2.0 / noised.size)
    mean_square = jnp.maximum(jnp.mean(jnp.square(noised)), 1e-30)
    return jnp.clip(1.0 - margin * noise_std ** 2 / mean_square, 0.0, 1.0) * noised


def next_state(dp: DpSettings, state: dict, within_count: jax.Array) -> dict:
    """The DP state after a round: C moved towards the target quantile (adaptive clipping) or kept; DP-FTRL's
    next noise row."""
    if dp.ftrl:
        return {**state, "step": state["step"] + 1}
    if not dp.adaptive:
        return state
    fraction = within_count / dp.expected_clients
    clip_norm = state["clip_norm"] * jnp.exp(-dp.clip_learning_rate * (fraction - dp.target_quantile))
    return {"clip_norm": clip_norm.astype(jnp.float32)}


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
    if dp.noise_multiplier > 0 and math.isinf(dp.clip_norm):
        return "fed.dp.clip_norm must be finite when fed.dp.noise_multiplier > 0 (the noise is proportional to it)."
    if dp.adaptive and math.isinf(dp.clip_norm):
        return "fed.dp.adaptive needs a finite starting fed.dp.clip_norm."
    return None
