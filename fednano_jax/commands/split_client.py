"""One client as its own process, started by `python -m fednano_jax.main --split_server=HOST:PORT` (not typed by
users): `python -m fednano_jax.commands.split_client`.

It is told who it is by the driver's first message (the experiment's settings file, its client id, the split
server's address, its token and the server's certificate: never on the command line, where other users could read
a token), loads NanoEdge alone (`Family.edge`: no decoder tensor is read) and the experiment's dataset, says it is
ready, then trains each round it is handed (`serving/client_processes.py`), its wire going to the split-step server,
until the driver closes its stdin.
"""

from __future__ import annotations

import json
import sys


def client_of(hello: dict):
    """-> (RemoteClient, StepClient, what it holds: weight bytes, sequence positions, image tokens) for the driver's
    hello: the experiment it names, NanoEdge and the data."""
    import ml_collections

    from fednano_jax.config import read

    with open(hello["experiment"]) as file:
        config = read(ml_collections.ConfigDict(json.load(file)))
    certificate = hello.get("root_certificates", "").encode() or None
    from fednano_jax.serving.client_processes import edge_client

    client, link, held, _ = edge_client(config, int(hello["client"]), hello["address"], hello.get("token", ""),
                                        certificate)
    return client, link, held


def main() -> int:
    import traceback

    from fednano_jax.serving.client_processes import (pack, protocol_streams, read_message, serve_rounds, unpack,
                                                      write_message)
    from fednano_jax.serving.step_client import SplitStepError

    incoming, outgoing = protocol_streams()
    blob = read_message(incoming)
    if blob is None:
        return 0
    try:
        client, link, held = client_of(unpack(blob)[1])
    except Exception as error:  # noqa: BLE001 - the driver prints the sentence; the traceback goes to the log
        traceback.print_exc()
        write_message(outgoing, pack({}, {"error": f"could not load NanoEdge and its data ({type(error).__name__}: "
                                                   f"{error})"}))
        return 1
    write_message(outgoing, pack({}, {"kind": "ready", **held}))
    try:
        serve_rounds(incoming, outgoing, client.train,
                     lambda: {"split_sent": link.bytes_sent, "split_received": link.bytes_received}, (SplitStepError,))
    finally:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
