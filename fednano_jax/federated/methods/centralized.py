"""Centralized training, the upper bound: one "client" holding every client's data, the same epochs."""

from fednano_jax.federated.methods.base import Method


class Centralized(Method):
    name, label = "centralized", "Centralized"
    no_ranks = "it trains one pooled client, which has no rank of its own"
    uploads = downloads = ()  # the data are pooled where the model is: nothing crosses a network
    pooled = True
    no_sums = ("Centralized pools every client's raw data where the model is, so no client contribution is sent "
               "to be protected")
