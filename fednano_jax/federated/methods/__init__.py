"""The registry of federated methods: one module per method, chosen by name in `config.fed.methods`.

Adding a method is one new module with a `Method` subclass (see `base.py`) and one line here.
"""

from __future__ import annotations

from fednano_jax.errors import ConfigError
from fednano_jax.federated.methods.base import Method
from fednano_jax.federated.methods.centralized import Centralized
from fednano_jax.federated.methods.feddpa_f import FedDPAF
from fednano_jax.federated.methods.fedavg import FedAvg
from fednano_jax.federated.methods.fednano import FedNano
from fednano_jax.federated.methods.fednano_ef import FedNanoEF
from fednano_jax.federated.methods.fedprox import FedProx
from fednano_jax.federated.methods.locft import LocFT
from fednano_jax.federated.methods.scaffold import Scaffold
from fednano_jax.federated.server_optimizer import LABELS as SERVER_LABELS, server_optimizer
from fednano_jax.privacy import dp as client_dp

METHODS: dict[str, type[Method]] = {m.name: m for m in [
    Centralized, LocFT, FedAvg, FedProx, FedDPAF, FedNano, FedNanoEF, Scaffold]}
PAPER_METHODS = ("centralized", "locft", "fedavg", "fedprox", "feddpa_f", "fednano", "fednano_ef")  # its Table 2


def get_method(name: str, fed, seed: int = 0) -> Method:
    """The method `name`, reading its settings from the config's `fed` section; `seed`: the run's."""
    if name not in METHODS:
        raise ConfigError(f"Unknown method {name!r}; expected one of {sorted(METHODS)}.")
    method = METHODS[name](fed, seed)
    if server_optimizer(fed, method) is not None:  # the report's row says what stepped the global adapters
        method.label = f"{method.label} + {SERVER_LABELS[fed.server_optimizer]}"
    dp = client_dp.settings(fed, [1])  # the guarantee does not depend on the clients' sizes
    if dp is not None:
        method.label = f"{method.label} + DP (ε={dp.epsilon(fed.rounds):.2f}, δ={dp.delta:g})"
    return method
