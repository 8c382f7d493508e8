"""An in-process Flower Grid for tests: the ServerApp's messages go to ClientApps called in this process, one node
per client, each message serialised and parsed with Flower's own protobuf serde (as SuperLink carries it), and an
exception in a ClientApp answered as Flower answers it: an error reply. `received` keeps every reply the ServerApp
was handed (the spy of what it holds)."""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto


class InProcessGrid:
    def __init__(self, client_app, node_configs: list[dict], dead: set[int] = frozenset()):
        self.client_app = client_app
        self.nodes = {1000 + i: Context(run_id=1, node_id=1000 + i, node_config=config, state=RecordDict(),
                                        run_config={}) for i, config in enumerate(node_configs)}
        self.dead = set(dead)  # node ids that never answer (a killed SuperNode)
        self.dies_at: dict[int, str] = {}  # node id -> the SecAgg+ stage from which on it never answers
        self.received: list[Message] = []
        self.run = type("Run", (), {"run_id": 1})()
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process is told

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message = message_from_proto(message_to_proto(_stamped(message)))
            node = message.metadata.dst_node_id
            if node in self.dead or _stage(message) in self._stages_gone(node):
                continue
            try:
                reply = self.client_app(message, self.nodes[node])
            except Exception as error:  # noqa: BLE001 - Flower turns a ClientApp's exception into an error reply
                reply = Message(Error(code=2, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            reply = message_from_proto(message_to_proto(reply))
            self.received.append(reply)
            replies.append(reply)
        return replies


    def _stages_gone(self, node: int) -> tuple:
        from flwr.common.secure_aggregation.secaggplus_constants import Stage

        stages = Stage._stages
        return stages[stages.index(self.dies_at[node]):] if node in self.dies_at else ()


def _stage(message: Message):
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    return configs.get(Key.STAGE) if configs is not None else None


def _stamped(message: Message) -> Message:
    """What the Grid fills in before a message leaves: ids and its run."""
    import uuid

    message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    message.metadata.__dict__["_run_id"] = 1
    return message
