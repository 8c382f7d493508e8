"""The privacy accountant of client-level DP: dp-accounting's RDP or PLD accountant over rounds of a
Poisson-subsampled Gaussian mechanism (DP-FedAvg, McMahan et al. 2018).

Each round releases one Gaussian sum of clipped client updates with noise multiplier z (noise std over the
sensitivity), each client in the cohort with probability q = fed.clients_per_round / fed.num_clients.
After R rounds the guarantee is the R-fold composition of that event; ε at δ is what the accountant says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# dp_accounting (with the scipy it brings, ~0.7 s) is imported inside the functions: only runs with DP pay for it.
if TYPE_CHECKING:
    import dp_accounting

# PLD's discretised privacy-loss distribution grows without bound as the noise vanishes: at z = 0.01 it took
# more than 24 GB here. Below this multiplier only the RDP accountant is used.
PLD_MIN_NOISE = 0.3


def round_event(noise_multiplier: float, sampling_probability: float) -> dp_accounting.DpEvent:
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_probability >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sampling_probability, gaussian)


def _fresh(accountant: str):
    import dp_accounting

    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant()
    return dp_accounting.rdp.RdpAccountant()


def epsilon(noise_multiplier: float, sampling_probability: float, rounds: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε at δ after `rounds` rounds (inf without noise; 0 before the first round)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    if accountant == "pld" and noise_multiplier < PLD_MIN_NOISE:
        raise ValueError(f"The PLD accountant needs fed.dp.noise_multiplier >= {PLD_MIN_NOISE} (its discretisation "
                         f"grows without bound as the noise vanishes), got {noise_multiplier:g}; use "
                         "fed.dp.accountant='rdp'.")
    ledger = _fresh(accountant)
    ledger.compose(round_event(noise_multiplier, sampling_probability), rounds)
    return float(ledger.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, sampling_probability: float, rounds: int, delta: float,
                      accountant: str = "rdp") -> float:
    """The smallest noise multiplier whose `rounds` rounds stay within (target ε, δ)."""
    import dp_accounting

    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _fresh(accountant),
        lambda z: dp_accounting.SelfComposedDpEvent(round_event(z, sampling_probability), rounds),
        target_epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(PLD_MIN_NOISE if accountant == "pld" else 1e-3, 1.0)))
