"""The commands users type, each behind a `python -m fednano_jax.NAME` entry point that `cli.run` starts."""
