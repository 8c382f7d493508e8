"""FedProx (Li et al., 2020): FedAvg plus mu/2 ||adapters - global||^2 in every local step (`fed.prox_mu`)."""

import dataclasses

import jax

from fednano_jax.federated.methods.base import Method
from fednano_jax.settings import require


@dataclasses.dataclass(frozen=True)
class ProxHyperparameters:
    prox_mu: float = 0.01  # weight of mu/2 * ||adapters - global||^2

    def __post_init__(self):
        require(self.prox_mu >= 0, f"fed.prox_mu must be non-negative, got {self.prox_mu}.")


class FedProx(Method):
    name, label = "fedprox", "FedProx"
    Hyperparameters = ProxHyperparameters

    def local_gradient(self, grads, adapters, start, broadcast, client_state):
        mu = self.hyperparameters.prox_mu
        return jax.tree.map(lambda g, a, s: g + mu * (a - s), grads, adapters, start)
