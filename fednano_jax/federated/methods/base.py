"""The method protocol: what a federated method is, as a small record of pure functions.

In the spirit of fedjax's `client_init / client_step / client_final` and `algorithm.init /
apply`, but every client hook runs inside `vmap` over the clients axis and `lax.scan` over
local steps, so each hook sees one client and must be traceable. The round loop
(`rounds.py`), the compiled programs, checkpointing and evaluation call only these hooks
and name no method.

A round, as the loop runs it:

    broadcast = method.broadcast(server_state)                          # server -> every sampled client
    per client (vmapped):
        start = method.local_start(broadcast, client_state)
        each local step: direction = method.local_gradient(grad, adapters, start, broadcast, client_state)
                         sums = method.accumulate(sums, step gradients)   # from method.sums_init(start)
        extra pass (FedNano's Fisher), over the first epoch: totals = method.extra_pass_step(totals, ...) per step,
                   from method.extra_pass_init(adapters) (None: no pass)
        upload, client_state = method.client_final(result, broadcast, client_state)
    server_state = method.server_update(server_state, uploads, weights, masks)  # weights: |D_k|, 0 if unusable;
                                                                                 # masks: clients' ranks, or None
    after the last round: client_states = method.after_rounds(...)       # FedDPA-F's local phase
    method.evaluate(evaluator, server_state, client_states, last)

Server state and client state (stacked on the clients axis, one row per client) are
checkpointed with the round and restored exactly. A method reads its settings from
`fed` (the config's `fed` section) once, when it is built.
"""

from __future__ import annotations

import jax

from fednano_jax.federated.aggregation import fedavg


class Method:
    name = ""  # what fed.methods says
    label = ""  # the row name in reports
    uploads: tuple[str, ...] = ("adapters",)  # the adapter-sized trees a client sends the server each round
    downloads: tuple[str, ...] = ("adapters",)  # the adapter-sized trees it receives (its broadcast)
    pooled = False  # one "client" holding every client's data (Centralized)
    extra_passes = 0  # passes over local data after training, through the server LLM (FedNano's Fisher)
    client_ranks = True  # runs with heterogeneous adapter ranks (model.adapter.client_ranks, models/adapter_ranks.py)

    @property
    def dp_aggregate(self) -> str | None:
        """Its aggregate under client-level DP (fed.dp, privacy/dp.py): "mean" when its server takes the
        example-weighted mean of uploaded adapters (DP-FedAvg's clipped, noised mean replaces it), "fisher"
        for the Fisher merge of both noised sums; None: it cannot run under DP."""
        plain = type(self).server_update is Method.server_update and "adapters" in self.uploads and not self.pooled
        return "mean" if plain else None

    def __init__(self, fed):
        self.fed = fed

    # ------------------------------------------------------------ client side
    def client_state_init(self, adapters):
        """What one client keeps between rounds, before its first round (None: nothing)."""
        return None

    def local_start(self, broadcast, client_state):
        """The adapters local training starts from."""
        return broadcast["adapters"]

    def local_gradient(self, grads, adapters, start, broadcast, client_state):
        """The direction the optimizer follows, from the data gradient (extra terms go here)."""
        return grads

    def sums_init(self, start):
        """Running sums over local steps (None: none)."""
        return None

    def accumulate(self, sums, grads):
        """Add one real step's `StepGradients` to the running sums."""
        return sums

    def extra_pass_init(self, adapters):
        """Running totals of a pass over the client's data after training, at its trained adapters (None: no pass)."""
        return None

    def extra_pass_step(self, totals, model, adapters, rows, valid):
        """Add one batch (rows, valid [batch]) to the totals; `model` has the graphdef, frozen backbone and data."""
        return totals

    def client_final(self, result, broadcast, client_state):
        """-> (upload, new client state) after local training and the extra pass (`client.LocalResult`)."""
        return {"adapters": result.adapters}, client_state

    # ------------------------------------------------------------ server side
    def server_init(self, adapters) -> dict:
        return {"adapters": adapters}

    def broadcast(self, server_state) -> dict:
        """What every sampled client receives at the start of a round."""
        return {"adapters": server_state["adapters"]}

    def server_update(self, server_state, uploads: dict, weights: jax.Array, masks=None) -> dict:
        """The new server state from the stacked uploads [K, ...]; `weights` [K] are the clients' example
        counts, zero for a client that did not report or whose upload was not finite (its upload is zeroed).
        `masks` [K, ...], shaped like the adapters: the rank components each client holds (heterogeneous
        ranks, `models/adapter_ranks.py`), or None when every client holds all of them."""
        merged = fedavg(uploads["adapters"], weights, masks, server_state["adapters"] if masks is not None else None)
        return {**server_state, "adapters": merged}

    # ------------------------------------------------------------ after the rounds, evaluation
    def after_rounds(self, server_state, client_states, local_trainer):
        """Client states after the last round. `local_trainer(start_adapters, epochs)` trains every client
        from the given (shared) adapters with plain local steps and returns their adapters [N, ...]."""
        return client_states

    def evaluate(self, evaluator, server_state, client_states, last: bool) -> dict:
        return evaluator.shared(server_state["adapters"])
