"""Server optimizers on the round's pseudo-gradient (Reddi et al., 2021, "Adaptive Federated Optimization").

A method's aggregate (FedAvg's weighted mean, FedNano's Fisher merge, ...) proposes new global
adapters. The pseudo-gradient is the old global adapters minus that proposal, and an optax
optimizer steps the global adapters along it: FedAvgM (SGD with momentum), FedAdagrad, FedAdam,
FedYogi (`fed.server_optimizer`, `fed.server_learning_rate`, `fed.server_momentum` for `avgm`;
betas and epsilon are optax's defaults). `none` takes the proposal as it is, as SGD with a step
of 1 and no momentum would. The optimizer's state is part of the server state, so it is
checkpointed and resumed with the round.

`fed.server_learning_rate = 0` (the default) is the optimizer's own step size, settings.DEFAULT_SERVER_LEARNING_RATES:
near where Reddi et al. tune them (FedAdam and FedYogi about 1e-2, FedAdagrad about 1e-1; FedAvgM keeps
FedAvg's step of 1). One shared default would not do: Adam at a step of 1 moves every coordinate by
about 1 per round, and FedNano on the tiny config fell from 75% to 37%.
"""

from __future__ import annotations

from typing import Callable

import optax

from fednano_jax.settings import NO_SERVER_OPTIMIZER as NONE
OPTIMIZERS: dict[str, Callable] = {
    "avgm": lambda fed: optax.sgd(fed.effective_server_learning_rate, momentum=fed.server_momentum),
    "adagrad": lambda fed: optax.adagrad(fed.effective_server_learning_rate),
    "adam": lambda fed: optax.adam(fed.effective_server_learning_rate),
    "yogi": lambda fed: optax.yogi(fed.effective_server_learning_rate),
}
LABELS = {"avgm": "server momentum", "adagrad": "server Adagrad", "adam": "server Adam", "yogi": "server Yogi"}
STATE = "server_optimizer"  # its key in the server state


def server_optimizer(fed, method) -> optax.GradientTransformation | None:
    """The config's server optimizer for `method`, or None: `none`, or a method whose clients upload no
    global adapters (LocFT) or that pools the data (Centralized) has no pseudo-gradient to follow."""
    name = fed.server_optimizer
    if name == NONE or method.pooled or "adapters" not in method.uploads:
        return None
    return OPTIMIZERS[name](fed)


def init_state(optimizer: optax.GradientTransformation | None, server_state: dict) -> dict:
    if optimizer is None:
        return server_state
    return {**server_state, STATE: optimizer.init(server_state["adapters"])}


def step(optimizer: optax.GradientTransformation | None, old: dict, proposed: dict) -> dict:
    """The server state after the round: `proposed` (the method's update of `old`) with its global adapters
    replaced by one optimizer step from `old`'s along the pseudo-gradient old - proposed."""
    if optimizer is None:
        return proposed
    pseudo_gradient = optax.tree.sub(old["adapters"], proposed["adapters"])
    updates, state = optimizer.update(pseudo_gradient, old[STATE], old["adapters"])
    return {**proposed, "adapters": optax.apply_updates(old["adapters"], updates), STATE: state}
