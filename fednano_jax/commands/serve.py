"""`python -m fednano_jax.serve --config=configs/easyvqa_tiny.py --port=50051`: the split-step server.

It holds the config's frozen LLM (the decoder and LM head; `serving/step_server.py`) and answers the clients'
split steps over gRPC until it is stopped (Ctrl-C or SIGTERM). It listens on 127.0.0.1 unless `--host` says
otherwise; with `--tls_cert` and `--tls_key` the link is TLS, without them it says once that it is plaintext.
`--tokens` names a JSON file of client id -> secret; each request must carry its client's.
"""

from __future__ import annotations

import json
import os
import signal
import threading

from absl import flags

from fednano_jax.commands import cli
from fednano_jax.errors import ConfigError

FLAGS = flags.FLAGS


def read_tokens(path: str | None, num_clients: int) -> dict[int, str] | None:
    """--tokens: {"0": "secret", ...} for clients 0..N-1 (None: no file, no tokens asked)."""
    if not path:
        return None
    try:
        with open(path) as file:
            raw = json.load(file)
        tokens = {int(client): str(secret) for client, secret in raw.items()}
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f"--tokens={path!r} must be a readable JSON object of client id -> token ({error}).")
    missing = sorted(set(range(num_clients)) - set(tokens))
    if missing or any(not secret for secret in tokens.values()):
        raise ConfigError(f"--tokens={path!r} must give every client 0..{num_clients - 1} a non-empty token; "
                          f"missing: {missing}.")
    return tokens


def credentials(cert: str | None, key: str | None):
    """TLS credentials from --tls_cert and --tls_key (PEM files), or None for plaintext."""
    import grpc

    if bool(cert) != bool(key):
        raise ConfigError("--tls_cert and --tls_key go together: pass both PEM files, or neither for plaintext.")
    if not cert:
        return None
    for flag, path in (("--tls_cert", cert), ("--tls_key", key)):
        if not os.path.isfile(path):
            raise ConfigError(f"{flag}={path!r} is not a file; expected a PEM file.")
    with open(key, "rb") as k, open(cert, "rb") as c:
        return grpc.ssl_server_credentials([(k.read(), c.read())])


def server_half(config):
    """The config's frozen decoder and LM head (`Family.server_half`): the server's part of the backbone alone."""
    from fednano_jax.backbone.family import family_of
    from fednano_jax.backbone.stored import stored_backbones
    from fednano_jax.data import datasets

    pretrains = not config.model.path and not stored_backbones(config)  # pretraining it first needs the data
    return family_of(config).server_half(config, datasets.load_splits(config) if pretrains else None)


def main() -> None:
    import jax
    from flax import nnx

    from fednano_jax.config import read
    from fednano_jax.parallel.mesh import make_mesh, mesh_description, place_backbone
    from fednano_jax.serving.client_processes import peak_rss_bytes
    from fednano_jax.parallel.xla_stats import use_compilation_cache_of
    from fednano_jax.serving.step_server import CLIENT_LAYERS_NOT_SERVED, Limits, StepServer, grpc_server

    config = read(FLAGS.config)
    use_compilation_cache_of(config)
    if config.model.client_layers:
        raise ConfigError(CLIENT_LAYERS_NOT_SERVED)
    tokens = read_tokens(FLAGS.tokens, config.fed.num_clients)
    tls = credentials(FLAGS.tls_cert, FLAGS.tls_key)
    if not 0 <= FLAGS.port < 65536:
        raise ConfigError(f"--port must be a TCP port (0 for any free one), got {FLAGS.port}.")
    mesh = make_mesh(config.mesh)
    print(mesh_description(mesh), flush=True)
    graph, state = nnx.split(server_half(config))
    server = nnx.merge(graph, place_backbone(state, mesh, config.mesh))  # sharded as a run places the backbone
    held = sum(x.nbytes for x in jax.tree.leaves(nnx.state(server)))
    print(f"Holding the frozen decoder and LM head alone: {held / 2**20:.2f} MiB of weights", flush=True)
    steps = StepServer(server, config.fed.num_clients, tokens,
                       Limits(max_rows=FLAGS.max_rows, max_wait_ms=FLAGS.max_wait_ms))
    try:
        server, port = grpc_server(steps, f"{FLAGS.host}:{FLAGS.port}", tls)
    except RuntimeError as error:  # grpc cannot bind
        steps.close()
        raise ConfigError(f"Cannot listen on {FLAGS.host}:{FLAGS.port} ({error}); pass another --port.") from None
    if tls is None:
        print("No TLS: the split-step link is plaintext (pass --tls_cert and --tls_key to encrypt it).", flush=True)
    print(f"Serving split steps of {config.name} for {config.fed.num_clients} clients on {FLAGS.host}:{port}",
          flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait(10)
    steps.close()
    print(f"Stopped after {steps.stats['requests']} steps in {steps.stats['calls']} batched calls "
          f"({steps.stats['refused']} refused); peak memory {peak_rss_bytes() / 2**20:.0f} MiB.", flush=True)


def define_flags() -> None:
    cli.define_config_flag()
    flags.DEFINE_string("host", "127.0.0.1", "The address to listen on (127.0.0.1: this machine only).")
    flags.DEFINE_integer("port", 50051, "The TCP port (0: any free one, printed when serving).")
    flags.DEFINE_string("tls_cert", None, "PEM certificate of the server (with --tls_key): TLS on the link.")
    flags.DEFINE_string("tls_key", None, "PEM private key of the server (with --tls_cert).")
    flags.DEFINE_string("tokens", None, "JSON file of client id -> token; each request must carry its client's.")
    flags.DEFINE_integer("max_rows", 64, "Rows in one batched call of the LLM (one client's batch at most).")
    flags.DEFINE_float("max_wait_ms", 5.0, "How long a step waits for other clients' steps to share its call.")
