"""One process of a 2-process federated round (run by test_sharding.py): prints the final adapters as JSON."""

import json
import sys

from fednano_jax.parallel import mesh as sharding

sharding.initialize_distributed(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))

import jax  # noqa: E402

from conftest import tiny_config as tiny_config_fixture  # noqa: E402
from test_sharding import federated_run, mesh_config  # noqa: E402

config = tiny_config_fixture.__wrapped__()
mesh = sharding.make_mesh(mesh_config())
result = federated_run(config, "fedavg", num_clients=4, cohort=3, mesh=mesh, mesh_cfg=mesh_config())
adapters = [sharding.to_host(x).tolist() for x in jax.tree.leaves(result.server["adapters"])]
print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                              "loss": result.history[0]["train_loss"],
                              "adapters": adapters}))
