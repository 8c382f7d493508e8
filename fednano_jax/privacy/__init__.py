"""Privacy beyond "no raw data leaves the client": client-level differential privacy (dp.py, accountant.py),
secure aggregation (secagg.py) and attacks on the split wire (wire_audit.py). Imports only jax, numpy,
optax, dp-accounting, cryptography and `streams`: federated/ builds on it, never the reverse."""
