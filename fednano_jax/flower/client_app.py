"""FedNano's ClientApp (`pyproject.toml`'s `clientapp`): one client of the federation on its SuperNode.

Its node config says who it is and where the split-step server is (`flower-supernode --node-config`):
    partition-id=K                    its client id, 0 .. fed.num_clients - 1 (its partition of the data)
    split-address='HOST:PORT'         the split-step server (`python -m fednano_jax.serve`)
    split-token-file='PATH'           optional: a file holding its token for that server
    split-root-cert='PATH'            optional: the server's PEM certificate (TLS)
Flower starts a ClientApp process for each message, so each message loads NanoEdge alone (never a decoder tensor)
and the data, then trains the round it is handed (`serving/client_processes.RemoteClient`: the simulation's client
program, its wire to the split-step server). Under secure aggregation it computes its own contribution and replies
with its digits for SecAgg+ (`secaggplus_mod` masks them; `flower/messages.py`).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fednano_jax.config import read
from fednano_jax.errors import ConfigError
from fednano_jax.federated.methods import get_method
from fednano_jax.federated.secure import flat
from fednano_jax.federated.server import Aggregation, ClientUploads, client_contributions
from fednano_jax.flower.messages import reply_content, round_of, to_limbs
from fednano_jax.metrics import process_age_seconds
from fednano_jax.privacy import dp as client_dp
from fednano_jax.serving.client_processes import _skeleton, edge_client, peak_rss_bytes
from fednano_jax.serving.step_client import SplitStepError



def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` for the messages of a SecAgg+ round (they carry its stage); plain rounds pass."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secagg_when_asked])


def node_settings(context: Context) -> tuple[int, str, str, bytes | None]:
    """-> (client id, split server address, token, root certificate) from the node config, or a ConfigError."""
    node = context.node_config
    if "partition-id" not in node or "split-address" not in node:
        raise ConfigError("the SuperNode's --node-config needs partition-id=K and split-address='HOST:PORT'; got "
                          f"{dict(node)}.")
    token, certificate = "", None
    if node.get("split-token-file"):
        with open(str(node["split-token-file"])) as file:
            token = file.read().strip()
    if node.get("split-root-cert"):
        with open(str(node["split-root-cert"]), "rb") as file:
            certificate = file.read()
    return int(node["partition-id"]), str(node["split-address"]), token, certificate


def _client(experiment: str, context: Context):
    config = read(ml_collections.ConfigDict(json.loads(experiment)))
    client_id, address, token, certificate = node_settings(context)
    return (config, client_id, *edge_client(config, client_id, address, token, certificate))


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Who this node is (its partition) and what its client holds, or why it cannot start."""
    try:
        _, client_id, _, link, held, _ = _client(str(msg.content.config_records["hello"]["experiment"]), context)
        link.close()
        said = {"partition": client_id, **held}
    except Exception as error:  # noqa: BLE001 - the ServerApp prints the sentence; the traceback is in the node's log
        said = {"error": f"{type(error).__name__}: {error}"}
    return Message(RecordDict({"hello": ConfigRecord(said)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round's local update -> its upload and state (or, under secure aggregation, its contribution's digits),
    its loss and its traffic."""
    started = time.perf_counter()
    trees, header = round_of(msg.content)
    config, client_id, client, link, _, data = _client(header["experiment"], context)
    if int(header["client"]) != client_id:
        raise ConfigError(f"this node is client {client_id} (partition-id) but was sent client {header['client']}'s "
                          "round.")
    secure = header.get("secure") == "1"
    method = get_method(header["method"], config.fed, config.seed)
    if secure:
        trees["broadcast"] = method.broadcast(trees["server"])
    loaded = time.perf_counter()
    try:
        result = client.train(trees, header)
    except SplitStepError as error:
        if secure:  # SecAgg+ adds only vectors: a failed client leaves its protocol (an error reply)
            raise
        return Message(reply_content({}, {"error": str(error)}), reply_to=msg)
    finally:
        link.close()
    age = process_age_seconds()  # the process's start to now: its interpreter, imports and loading included
    start_s = (age - (time.perf_counter() - loaded)) if age is not None else loaded - started
    metrics = {"loss": float(result["loss"]), "split_sent": link.bytes_sent, "split_received": link.bytes_received,
               "peak_rss": peak_rss_bytes(), "start_ms": int(1000 * start_s),
               "train_ms": int(1000 * (time.perf_counter() - loaded))}
    if not secure:
        sent = {"upload": result["upload"], "state": result["state"], "loss": result["loss"]}
        metrics["upload"] = sum(np.asarray(x).nbytes for x in jax.tree.leaves(result["upload"]))
        return Message(reply_content(jax.tree.map(np.asarray, sent), metrics), reply_to=msg)
    contribution, used = own_contribution(method, config, data, client_id, trees, result["upload"],
                                          int(header["round"]))
    digits = to_limbs(flat(contribution), int(header["limb_bits"]))
    metrics |= {"used": int(used), "upload": sum(d.size * 4 for d in digits),  # SecAgg+ sends int32 entries
                "layout": json.dumps({"skeleton": _skeleton(contribution),
                                      "shapes": [list(x.shape) for x in jax.tree.leaves(contribution)]})}
    return Message(reply_content({"digits": {str(i): d for i, d in enumerate(digits)}}, metrics), reply_to=msg)


def own_contribution(method, config, data, client_id: int, trees: dict, upload, round_index: int):
    """-> (this client's weighted contribution, as the simulation's clients compute theirs, whether it is used):
    `server.client_contributions` for a cohort of one, with the run's DP settings and this client's noise key."""
    weights = np.array([method.client_weight(len(rows)) for rows in data.client_train], np.float64)
    dp = client_dp.settings(config.fed, weights)
    keys = client_dp.client_noise_keys(config.seed, round_index, [client_id]) if dp is not None and dp.distributed \
        else None
    rank = trees.get("rank")
    uploads = ClientUploads(jax.tree.map(lambda x: jnp.asarray(x)[None], upload),
                            jnp.asarray([len(data.client_train[client_id])]),
                            None if rank is None else jnp.asarray(rank)[None])
    stacked, used = client_contributions(method, trees["server"], uploads, jnp.ones(1, bool),
                                         Aggregation(config.fed.rank_aggregation, dp), keys)
    return jax.tree.map(lambda x: np.asarray(x[0]), stacked), bool(np.asarray(used)[0])

