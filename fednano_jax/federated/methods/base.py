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
    per client:  contribution = method.contribution(upload, broadcast, mask)  # a dict of trees, per unit weight
    sums = an aggregator's Σ_k w_k contribution_k (plain, rank-masked, secure, DP: `federated/aggregation.py`,
           `federated/server.py`, `federated/secure.py`, `privacy/dp.py`)
    server_state = method.finalize(server_state, sums)                   # then the server optimizer steps
    after the last round: client_states = method.after_rounds(...)       # FedDPA-F's local phase
    method.evaluate(evaluator, server_state, client_states, last)

Server state and client state (stacked on the clients axis, one row per client) are
checkpointed with the round and restored exactly. A method reads its settings from
`fed` (settings.Fed) and its own `Hyperparameters` once, when it is built.
"""

from __future__ import annotations


import dataclasses

from fednano_jax.federated.aggregation import DELTA, apply_sums, mean_contribution, update_of


@dataclasses.dataclass(frozen=True)
class NoHyperparameters:
    """A method's own settings, read from the config's `fed` section: a frozen dataclass whose fields are those
    keys, with their defaults, checking its values in __post_init__ (settings.require)."""


class Method:
    name = ""  # what fed.methods says
    label = ""  # the row name in reports
    uploads: tuple[str, ...] = ("adapters",)  # the adapter-sized trees a client sends the server each round
    downloads: tuple[str, ...] = ("adapters",)  # the adapter-sized trees it receives (its broadcast)
    pooled = False  # one "client" holding every client's data (Centralized)
    local_phase = False  # its after_rounds trains every client locally (FedDPA-F)
    extra_passes = 0  # passes over local data after training, through the server LLM (FedNano's Fisher)
    # Why it cannot run with heterogeneous adapter ranks (model.adapter.client_ranks, models/adapter_ranks.py),
    # or None: it can.
    no_ranks = None
    unweighted: tuple[str, ...] = ()  # contribution entries summed without the client's weight
    # Why the method has no sums for DP or secure aggregation to act on (None: it has them).
    no_sums = None
    Hyperparameters: type = NoHyperparameters  # its own settings (keys of `fed`), declared by the method
    extra_pass_examples = 0  # examples of its first epoch the extra pass uses (0: all)
    remote = None  # a host function serving its wire from a split-step server (objective.Wire.remote); None: local

    def __init__(self, fed, seed: int = 0):
        self.fed = fed  # settings.Fed
        self.hyperparameters = fed.of(self.name, self.Hyperparameters)
        self.seed = seed  # the run's seed: the streams a client's own randomness comes from (streams.py)

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

    def extra_pass_step(self, totals, shared, adapters, rows, valid):
        """Add one batch (rows, valid [batch]) to the totals; `shared` (`client.SharedInputs`): the graphdef,
        frozen backbone and data."""
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

    def plain(self) -> "Method":
        """The same settings without the method's hooks: plain local training (FedDPA-F's local phase)."""
        return Method(self.fed, self.seed)

    def client_weight(self, num_examples):
        """A client's weight w_k in the sums: its example count."""
        return num_examples

    def contribution(self, upload: dict, broadcast: dict, mask=None) -> dict:
        """One client's terms of the sums, per unit of its weight (`aggregation.py`): FedAvg's update and unit
        weight. `mask`: the rank components the client holds (heterogeneous ranks), or None."""
        return mean_contribution(update_of(upload["adapters"], broadcast["adapters"]), mask)

    def private_contribution(self, upload: dict, broadcast: dict, mask=None) -> dict:
        """Its contribution under client-level DP, before clipping (`privacy/dp.py`)."""
        return self.contribution(upload, broadcast, mask)

    def dp_bounds(self, clip_norm, adapters) -> dict:
        """{entry: (L2 bound per unit weight, share of the noise budget)} of the contribution entries DP clips and
        noises (the shares add up to one); the rest are public."""
        return {DELTA: (clip_norm, 1.0)}

    def finalize(self, server_state: dict, sums: dict) -> dict:
        """The new server state from the round's sums (Σ_k w_k contribution_k over the clients used)."""
        return {**server_state, "adapters": apply_sums(server_state["adapters"], sums)}

    # ------------------------------------------------------------ after the rounds, evaluation
    def after_rounds(self, server_state, client_states, local_trainer):
        """Client states after the last round. `local_trainer(start_adapters, epochs)` trains every client
        from the given (shared) adapters with plain local steps and returns their adapters [N, ...]."""
        return client_states

    def evaluation_programs(self, graphdef, frozen, adapters, prompts, last_prompt_index, local_weights,
                            decode: dict) -> dict:
        """{name: () -> jax.stages.Lowered}: the compiled programs its evaluation adds to the shared greedy
        decoding, on abstract arguments (`commands/memory_plan.py` plans them)."""
        return {}

    def evaluate(self, evaluator, server_state, client_states, last: bool) -> dict:
        return evaluator.shared(server_state["adapters"])
