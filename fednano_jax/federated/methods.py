"""One registry entry per federated method, chosen by name in `config.fed.methods`.

Every method shares the vmapped client machinery; an entry only says how clients
train (proximal term, running Fisher), what they upload and how the server merges it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from fednano_jax.federated.aggregation import fedavg, fisher_merge
from fednano_jax.federated.client import LocalOptions


def _fedavg(adapters, fishers, counts, fed):
    return fedavg(adapters, counts)


def _fisher_merge(adapters, fishers, counts, fed):
    return fisher_merge(adapters, fishers, counts, fed.fisher_floor)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str  # row name in reports
    aggregate: Callable | None  # (client adapters, fishers | None, counts, fed config) -> global; None: no server
    fisher: str = "none"  # "extra_pass" (FedNano), "during_training" (FedNano-EF) or "none"
    prox: bool = False  # FedProx's proximal term, weight fed.prox_mu
    pooled: bool = False  # Centralized: all clients' data in one training run (the upper bound)
    personal: str = "none"  # "local": LocFT, each client keeps its own adapters; "dpa": FedDPA-F

    def local_options(self, fed) -> LocalOptions:
        return LocalOptions(prox_mu=fed.prox_mu if self.prox else 0.0,
                            accumulate_fisher=self.fisher == "during_training")

    @property
    def uploads(self) -> int:
        """Adapter-sized trees a client uploads per round: adapters, plus a Fisher for FedNano."""
        if self.aggregate is None or self.pooled:
            return 0
        return 2 if self.fisher != "none" else 1


METHODS = {m.name: m for m in [
    Method("centralized", "Centralized", _fedavg, pooled=True),
    Method("locft", "LocFT", None, personal="local"),
    Method("fedavg", "FedAvg", _fedavg),
    Method("fedprox", "FedProx", _fedavg, prox=True),
    Method("feddpa_f", "FedDPA-F", _fedavg, personal="dpa"),
    Method("fednano", "FedNano", _fisher_merge, fisher="extra_pass"),
    Method("fednano_ef", "FedNano-EF", _fisher_merge, fisher="during_training"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; expected one of {sorted(METHODS)}.")
    return METHODS[name]
