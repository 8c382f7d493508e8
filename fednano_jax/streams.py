"""Every random stream of a run, keyed [seed, PURPOSE, round, client id].

Each random choice draws from its own numpy Generator, so no two purposes ever share
a stream (cohort sampling cannot collide with a client's shuffling), and a choice about
one client depends only on the seed, the round and that client's id: never on which
other clients share the round, their order in the cohort, or how many there are.
Streams that are not per round or per client (the partition, the question sample)
use 0 there, or an index of their own (which split) in the round slot.
"""

from __future__ import annotations

import enum

import numpy as np


class Purpose(enum.IntEnum):
    PARTITION = 1  # Dirichlet proportions, and each split's shuffle before it is cut
    QUESTIONS = 2  # the federated train / test questions sampled from the pools
    SHUFFLE = 3  # a client's local batches in a round
    COHORT = 4  # which clients take part in a round
    DROPOUT = 5  # whether a sampled client reports in a round
    DPA_REFERENCES = 6  # FedDPA-F's reference training inputs of a client
    HOLD_ASIDE = 7  # (pretrain.seed) the training examples held aside for backbone pretraining
    PRETRAIN_QUESTIONS = 8  # (pretrain.seed) text-only questions of a held-aside image
    PRETRAIN_BATCHES = 9  # (pretrain.seed) the pretraining batch order
    LOCAL_PHASE = 10  # a method's local training after the rounds (FedDPA-F's local adapters)
    DP_NOISE = 11  # the server's Gaussian noise of a round under client-level DP
    SECAGG_KEYS = 12  # a client's X25519 key and self-mask seed in a round of secure aggregation
    SECAGG_SHARES = 13  # the random coefficients of its Shamir shares
    WIRE_NOISE = 14  # the Gaussian noise on the embeddings a client sends the server (fed.wire_noise)
    FTRL_NOISE = 15  # DP-FTRL's noise key, one per run: round t's noise is C⁻¹z's row t (privacy/ftrl.py)


def generator(seed: int, purpose: Purpose, round_index: int = 0, client_id: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(purpose), int(round_index), int(client_id)])
