"""Centralized training, the upper bound: one "client" holding every client's data, the same epochs."""

from fednano_jax.federated.methods.base import Method


class Centralized(Method):
    name, label = "centralized", "Centralized"
    client_ranks = False  # no heterogeneous ranks: one pooled client has no rank of its own
    uploads = downloads = ()  # the data are pooled where the model is: nothing crosses a network
    pooled = True
