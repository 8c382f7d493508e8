"""The privacy accountant of client-level DP: dp-accounting's RDP or PLD accountant over what a run releases.

Each round releases a Gaussian sum of clipped client contributions; the noise multiplier z is the noise's std
over one client's sensitivity. Which event that is depends on who takes part (`fed.cohort_sampling`) and on the
mechanism (`fed.dp.mechanism`); after t rounds the guarantee is:

- DP-FedAvg, fixed-size cohorts: t rounds of a Poisson-subsampled Gaussian at q = cohort / clients (the cohort
  is drawn at a fixed size while this assumes Poisson sampling at the same rate, as most FL simulations do);
- DP-FedAvg, Poisson cohorts: t rounds of dp-accounting's truncated subsampled Gaussian (each client joins with
  probability q; a draw beyond the program's `fed.cohort_capacity` is cut to a random subset of that size);
- DP-FedAvg, cyclic cohorts: each client takes part every `cycle` rounds, so ceil(t / cycle) Gaussians with no
  amplification (jax-privacy's cyclic accountant, `DpsgdTrainingAccountant`, gives the same);
- DP-FTRL (BandMF, `privacy/ftrl.py`), cyclic cohorts: the whole run is one Gaussian release C x + z of
  sensitivity √k (k: a client's turns, jax-privacy's min-separation count) per unit of clip, so after t rounds
  it is one Gaussian of multiplier z √(k_R / k_t) (jax-privacy's `SingleReleaseTrainingAccountant`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

from fednano_jax.settings import CYCLIC, FTRL, GAUSSIAN, POISSON

# dp_accounting (with the scipy it brings, ~0.7 s) is imported inside the functions: only runs with DP pay for it.
if TYPE_CHECKING:
    import dp_accounting

# PLD's discretised privacy-loss distribution grows without bound as the noise vanishes: at z = 0.01 it took
# more than 24 GB here. Below this multiplier only the RDP accountant is used.
PLD_MIN_NOISE = 0.3
PLD_DISCRETIZATION = 1e-4  # dp-accounting's PLDAccountant default


@dataclasses.dataclass(frozen=True)
class Participation:
    """Who takes part in a round, as the accountant sees it (`fed.cohort_sampling` and its sizes)."""

    sampling: str  # fixed, poisson or cyclic
    num_clients: int
    expected_cohort: int
    capacity: int  # poisson: the slots a larger draw is truncated to
    cycle: int = 1  # cyclic: the rounds between a client's turns

    @property
    def probability(self) -> float:
        return self.expected_cohort / self.num_clients

    def turns(self, rounds: int) -> int:
        """The most rounds one client can take part in among the first `rounds` (cyclic: jax-privacy's count)."""
        if self.sampling != CYCLIC:
            return rounds
        from jax_privacy.matrix_factorization import sensitivity

        return int(sensitivity.minsep_true_max_participations(rounds, self.cycle))


def participation_of(fed) -> Participation:
    return Participation(fed.cohort_sampling, fed.num_clients, fed.expected_cohort, fed.cohort_size,
                         fed.cycle if fed.cohort_sampling == CYCLIC else 1)


def round_event(noise_multiplier: float, participation: Participation) -> dp_accounting.DpEvent:
    """One round's release under DP-FedAvg, as a client sees it."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if participation.sampling == CYCLIC or participation.probability >= 1.0:
        return gaussian
    if participation.sampling == POISSON:
        return dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=participation.num_clients, sampling_probability=participation.probability,
            truncated_batch_size=participation.capacity, noise_multiplier=noise_multiplier)
    return dp_accounting.PoissonSampledDpEvent(participation.probability, gaussian)


def composed(noise_multiplier: float, participation: Participation, rounds: int, planned_rounds: int,
             mechanism: str = GAUSSIAN) -> tuple[dp_accounting.DpEvent, int]:
    """-> (event, count): the guarantee after `rounds` of a run of `planned_rounds` is `count` of `event`."""
    import dp_accounting

    if mechanism == FTRL:
        scale = math.sqrt(participation.turns(planned_rounds) / participation.turns(rounds))
        return dp_accounting.GaussianDpEvent(noise_multiplier * scale), 1
    return round_event(noise_multiplier, participation), participation.turns(rounds)


def epsilon(noise_multiplier: float, participation: Participation, rounds: int, delta: float,
            accountant: str = "rdp", mechanism: str = GAUSSIAN, planned_rounds: int | None = None) -> float:
    """ε at δ after `rounds` rounds of a run planned for `planned_rounds` (inf without noise; 0 before round one)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    if accountant == "pld" and noise_multiplier < PLD_MIN_NOISE:
        raise ValueError(f"The PLD accountant needs fed.dp.noise_multiplier >= {PLD_MIN_NOISE} (its discretisation "
                         f"grows without bound as the noise vanishes), got {noise_multiplier:g}; use "
                         "fed.dp.accountant='rdp'.")
    event, count = composed(noise_multiplier, participation, rounds, planned_rounds or rounds, mechanism)
    if accountant == "pld":
        return float(_one_release_pld(event).self_compose(count).get_epsilon_for_delta(delta))
    from dp_accounting import rdp

    ledger = rdp.RdpAccountant()
    ledger.compose(event, count)
    return float(ledger.get_epsilon(delta))


@functools.lru_cache(maxsize=32)
def _one_release_pld(event):
    """dp-accounting's privacy-loss distribution of one event, built once per run and self-composed per round:
    what its PLDAccountant does, without building the distribution again (about 2 s for a truncated event)."""
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution as pld

    if isinstance(event, dp_accounting.TruncatedSubsampledGaussianDpEvent):
        return pld.from_truncated_subsampled_gaussian_mechanism(
            dataset_size=event.dataset_size, sampling_probability=event.sampling_probability,
            truncated_batch_size=event.truncated_batch_size, noise_multiplier=event.noise_multiplier,
            value_discretization_interval=PLD_DISCRETIZATION)
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return pld.from_gaussian_mechanism(event.event.noise_multiplier, sampling_prob=event.sampling_probability,
                                           value_discretization_interval=PLD_DISCRETIZATION)
    return pld.from_gaussian_mechanism(event.noise_multiplier, value_discretization_interval=PLD_DISCRETIZATION)


@functools.lru_cache(maxsize=32)
def noise_for_epsilon(target_epsilon: float, participation: Participation, rounds: int, delta: float,
                      accountant: str = "rdp", mechanism: str = GAUSSIAN) -> float:
    """The smallest noise multiplier whose `rounds` rounds stay within (target ε, δ) (dp-accounting's
    calibration, to 1e-3 of its lower end)."""
    import dp_accounting

    def fresh():
        return dp_accounting.pld.PLDAccountant() if accountant == "pld" else dp_accounting.rdp.RdpAccountant()

    def event(z):
        one, count = composed(z, participation, rounds, rounds, mechanism)
        return dp_accounting.SelfComposedDpEvent(one, count)

    lower = PLD_MIN_NOISE if accountant == "pld" else 1e-3
    return float(dp_accounting.calibrate_dp_mechanism(
        fresh, event, target_epsilon, delta, dp_accounting.LowerEndpointAndGuess(lower, 1.0), tol=1e-3 * lower))
