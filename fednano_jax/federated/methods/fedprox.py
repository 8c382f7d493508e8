"""FedProx (Li et al., 2020): FedAvg plus mu/2 ||adapters - global||^2 in every local step (`fed.prox_mu`)."""

import jax

from fednano_jax.federated.methods.base import Method


class FedProx(Method):
    name, label = "fedprox", "FedProx"

    def local_gradient(self, grads, adapters, start, broadcast, client_state):
        mu = self.fed.prox_mu
        return jax.tree.map(lambda g, a, s: g + mu * (a - s), grads, adapters, start)
