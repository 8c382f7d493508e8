"""One registry entry per federated method, chosen by name in `config.fed.methods`."""

from __future__ import annotations

import dataclasses
from typing import Callable

from fednano_jax.federated.aggregation import fedavg, fisher_merge


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str  # row name in reports
    needs_fisher: bool  # clients run the extra Fisher pass and upload it
    aggregate: Callable  # (client_adapters, client_fishers | None, num_examples, fed_config) -> global adapters


METHODS = {
    "fedavg": Method("fedavg", "FedAvg", False, lambda adapters, fishers, n, fed: fedavg(adapters, n)),
    "fednano": Method("fednano", "FedNano", True,
                      lambda adapters, fishers, n, fed: fisher_merge(adapters, fishers, n, fed.fisher_floor)),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; expected one of {sorted(METHODS)}.")
    return METHODS[name]
