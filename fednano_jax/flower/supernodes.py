"""The ServerApp's clients: Flower's SuperNodes, one per client, as the round driver's `remote`
(`federated/rounds.py`), the Flower twin of `client_processes.ClientProcesses`.

Each round's local updates go out as train messages through the Grid (`grid.send_and_receive`, bounded by a
timeout): the broadcast, the client's row schedule and state in, its upload, new state, loss and traffic back.
A SuperNode that errs, dies or does not answer in time is left out of that round, as a dropout. Under secure
aggregation the round is Flower's SecAgg+ (`SecAggPlusWorkflow`): each client trains inside its masked-vector stage,
computes its own contribution (`federated/server.client_contributions`) and sends only its masked digits
(`flower/messages.to_limbs`); the ServerApp holds the sum alone.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey

from fednano_jax.errors import ClientProcessError
from fednano_jax.federated.client import ClientInputs, ClientOutputs
from fednano_jax.federated.secure import unflat
from fednano_jax.flower.messages import from_limbs, limb_bits, reply_of, round_content, secagg_ranges

HELLO = MessageType.QUERY  # the first message to every SuperNode: who it is (its partition) and what it holds
POLL_S = 1.0


class FlowerClients:
    """The run's SuperNodes, each named by its node config's partition-id (0 .. num_clients - 1). `experiment`: the
    experiment's settings as JSON, sent with every message (a ClientApp process starts from nothing each message)."""

    def __init__(self, grid, num_clients: int, experiment: str, node_timeout_s: float = 600.0,
                 round_timeout_s: float = 3600.0):
        self.grid, self.experiment, self.round_timeout_s = grid, experiment, round_timeout_s
        nodes = self._wait_for_nodes(num_clients, node_timeout_s)
        self.node_of, self.ready = self._hello(nodes, num_clients, node_timeout_s)

    def _wait_for_nodes(self, count: int, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while len(nodes := sorted(self.grid.get_node_ids())) < count:
            if time.monotonic() > deadline:
                raise ClientProcessError(f"{len(nodes)} of the {count} SuperNodes (fed.num_clients) connected within "
                                         f"{timeout_s:.0f} s; start one per client, each with its partition-id.")
            time.sleep(POLL_S)
        print(f"{len(nodes)} SuperNodes connected", flush=True)
        return nodes

    def _hello(self, nodes: list[int], count: int, timeout_s: float) -> tuple[dict[int, int], list[dict]]:
        """Ask every node its partition and what it holds -> (partition -> node id, what each client holds)."""
        content = RecordDict({"hello": ConfigRecord({"experiment": self.experiment})})
        replies = self.grid.send_and_receive([Message(content, node, HELLO) for node in nodes], timeout=timeout_s)
        node_of, held = {}, {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise ClientProcessError(f"SuperNode {node} could not start its client: {reply.error.reason}")
            said = dict(reply.content.config_records["hello"])
            if "error" in said:
                raise ClientProcessError(f"SuperNode {node} could not start its client: {said['error']}")
            partition = int(said.pop("partition"))
            if partition in node_of or not 0 <= partition < count:
                raise ClientProcessError(f"SuperNode {node}'s partition-id {partition} is out of 0..{count - 1} or "
                                         "taken by another node; give each SuperNode its own.")
            node_of[partition], held[partition] = node, {key: int(value) for key, value in said.items()}
        missing = sorted(set(range(count)) - set(node_of))
        if missing:
            raise ClientProcessError(f"no SuperNode answered for partitions {missing} within {timeout_s:.0f} s.")
        return node_of, [held[k] for k in range(count)]

    def close(self) -> None:
        """Nothing to stop: the SuperNodes outlive the run."""

    # ------------------------------------------------------------------------------------- plain rounds
    def _message(self, client: int, trees: dict, header: dict) -> Message:
        content = round_content(trees, {**header, "experiment": self.experiment, "client": str(client)})
        return Message(content, self.node_of[client], MessageType.TRAIN)

    def local_updates(self, method: str, plain: bool, epoch_steps: int, broadcast, cohort: np.ndarray,
                      clients: ClientInputs):
        """As `ClientProcesses.local_updates`, each client on its SuperNode."""
        header = {"method": method, "plain": str(int(plain)), "epoch_steps": str(epoch_steps)}
        messages = [self._message(int(k), {"broadcast": jax.tree.map(np.asarray, broadcast), **_row(clients, i)},
                                  header) for i, k in enumerate(cohort)]
        replies = replies_by_client(self.grid.send_and_receive(messages, timeout=self.round_timeout_s), messages,
                                    cohort)
        results, failures, traffic = [], [], []
        for k in cohort:
            trees, metrics, failure = self._read(replies.get(int(k)))
            results.append(trees), failures.append(failure), traffic.append(_traffic(metrics))
        finished = [r for r in results if r is not None]
        if not finished:
            raise ClientProcessError("no client finished its update (" + "; ".join(
                f"client {k}: {reason}" for k, reason in zip(cohort, failures)) + ")")
        stacked = [r or finished[0] for r in results]
        outputs = jax.tree.map(lambda *xs: np.stack(xs),
                               *[ClientOutputs(r["upload"], r["state"], r["loss"]) for r in stacked])
        return outputs, failures, traffic

    def _read(self, reply) -> tuple[dict | None, dict, str | None]:
        """-> (trees, metrics, why it failed or None) of one client's reply (None: no reply)."""
        if reply is None:
            return None, {}, f"its SuperNode did not answer within {self.round_timeout_s:.0f} s"
        if reply.has_error():
            return None, {}, f"its SuperNode reported: {reply.error.reason}"
        trees, metrics = reply_of(reply.content)
        if "error" in metrics:
            return None, metrics, str(metrics["error"])
        return trees, metrics, None

    # ------------------------------------------------------------------------------------ secure rounds
    adds_securely = True

    def secure_updates(self, method: str, epoch_steps: int, server_state, cohort: np.ndarray, clients: ClientInputs,
                       round_index: int, threshold: int):
        """A round under Flower's SecAgg+ -> (ClientOutputs [K] with losses, why each client failed or None, their
        traffic, the used clients' summed contributions or None (too few survived), used [K], costs)."""
        started = time.perf_counter()
        bits = limb_bits(len(cohort))
        header = {"method": method, "plain": "0", "epoch_steps": str(epoch_steps), "round": str(round_index),
                  "secure": "1", "limb_bits": str(bits)}
        server_state = jax.tree.map(np.asarray, server_state)
        fitins = {self.node_of[int(k)]: self._message(int(k), {"server": server_state, **_row(clients, i)},
                                                     header).content for i, k in enumerate(cohort)}
        strategy = _CohortStrategy(self.grid, fitins)
        context = LegacyContext(_bare_context(self.grid), strategy=strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_index + 1})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        shares = len(cohort) if len(cohort) > 2 else 1.0
        workflow = SecAggPlusKeepingEarlyLeavers(
            num_shares=shares, reconstruction_threshold=threshold if threshold < shares else 1.0, max_weight=1.0,
            timeout=self.round_timeout_s, **secagg_ranges(len(cohort)))
        workflow(self.grid, context)
        reported = strategy.reported  # node -> metrics, of the clients whose masked vectors were summed
        failures, losses, used, traffic = [], [], np.zeros(len(cohort), bool), []
        for i, k in enumerate(cohort):
            metrics = reported.get(self.node_of[int(k)])
            if metrics is None or "error" in metrics:
                failures.append(str(metrics["error"]) if metrics else "it left before SecAgg+'s sum (see the "
                                "ServerApp's log)"), losses.append(np.nan), traffic.append({})
                continue
            failures.append(None), losses.append(float(metrics["loss"])), traffic.append(_traffic(metrics))
            used[i] = bool(metrics["used"])
        if not any(reason is None for reason in failures):
            raise ClientProcessError("no client finished its update (" + "; ".join(
                f"client {k}: {reason}" for k, reason in zip(cohort, failures)) + ")")
        finished = next(loss for loss, reason in zip(losses, failures) if reason is None)
        losses = [finished if reason is not None else loss for loss, reason in zip(losses, failures)]  # as plain rounds
        cost = {"secagg_seconds": time.perf_counter() - started}
        outputs = ClientOutputs(None, None, np.array(losses))
        if strategy.aggregate is None or used.sum() < 1:
            return outputs, failures, traffic, None, np.zeros(len(cohort), bool), cost
        layout = json.loads(next(m for m in reported.values() if "layout" in m)["layout"])
        summed = from_limbs([digits * len(reported) for digits in strategy.aggregate], bits)  # SecAgg+ hands a mean
        return outputs, failures, traffic, unflat(summed, _template(layout)), used, cost


def replies_by_client(replies, messages: list[Message], cohort) -> dict[int, Message]:
    """client id -> its reply. By the message answered, not the sender: SuperLink answers for a node it lost (no
    heartbeat for a minute) with an error reply of its own."""
    client_of = {message.metadata.message_id: int(k) for message, k in zip(messages, cohort)}
    return {client_of[reply.metadata.reply_to_message_id]: reply for reply in replies
            if reply.metadata.reply_to_message_id in client_of}


def _row(clients: ClientInputs, i: int) -> dict:
    row = jax.tree.map(lambda x: np.asarray(x[i]), clients)
    return {"rows": row.rows, "valid": row.valid, "state": row.state, "rank": row.rank}


def _traffic(metrics: dict) -> dict:
    return {key: int(metrics[key]) for key in ("split_sent", "split_received", "upload", "peak_rss", "start_ms",
                                               "train_ms") if key in metrics}


def _template(layout: dict):
    def build(skeleton, shapes):
        if isinstance(skeleton, dict):
            return {key: build(value, shapes) for key, value in sorted(skeleton.items())}
        return np.zeros(shapes.pop(0), np.float32)

    return build(layout["skeleton"], list(layout["shapes"]))


def _bare_context(grid):
    from flwr.app import Context, RecordDict as State

    return Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=State(), run_config={})


class SecAggPlusKeepingEarlyLeavers(SecAggPlusWorkflow):
    """Flower's SecAgg+, going on when a client leaves before it has shared its keys. Flower 1.42 keeps such a client
    among the sampled ones: the unmask stage then asks for shares nobody holds, and the round halts after everyone
    trained. A client that left before sharing holds no mask with anyone (the others mask only with the clients
    whose shares reached them), so it is forgotten; and a client that leaves later has its masks removed only
    towards the clients that sent masked vectors (Flower removes them towards all its neighbours, which is wrong
    when two neighbours leave)."""

    @staticmethod
    def _forget_absent(state) -> None:
        state.sampled_node_ids = set(state.active_node_ids)
        state.nid_to_neighbours = {node: neighbours & state.active_node_ids
                                   for node, neighbours in state.nid_to_neighbours.items()
                                   if node in state.active_node_ids}

    def share_keys_stage(self, grid, context, state) -> bool:
        self._forget_absent(state)  # those that sent no public key
        return super().share_keys_stage(grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        self._forget_absent(state)  # those that sent no key shares
        return super().collect_masked_vectors_stage(grid, context, state)

    def unmask_stage(self, grid, context, state) -> bool:
        for node in state.sampled_node_ids - state.active_node_ids:  # left after sharing: masks with survivors only
            state.nid_to_neighbours[node] = (state.nid_to_neighbours[node] & state.active_node_ids) | {node}
        return super().unmask_stage(grid, context, state)


class _CohortStrategy(Strategy):
    """The legacy Strategy SecAggPlusWorkflow drives, reduced to this round: the cohort is ours (`fitins`: node id ->
    its message content), and the aggregate is kept as SecAgg+ hands it over (the survivors' mean digits)."""

    def __init__(self, grid, fitins: dict):
        self.grid, self.fitins = grid, fitins
        self.aggregate: list[np.ndarray] | None = None
        self.reported: dict[int, dict] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.compat.common import recorddict_compat as compat

        run_id = self.grid.run.run_id
        return [(GridClientProxy(node, self.grid, run_id), compat.recorddict_to_fitins(content, True))
                for node, content in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        for proxy, fitres in results:
            self.reported[proxy.node_id] = dict(fitres.metrics)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None
