"""FedAvg (McMahan et al., 2017): local epochs from the global adapters, example-weighted mean."""

from fednano_jax.federated.methods.base import Method


class FedAvg(Method):
    name, label = "fedavg", "FedAvg"
