"""`python -m fednano_jax.benchmark`: the command lives in `fednano_jax/commands/benchmark.py`."""

if __name__ == "__main__":
    from fednano_jax.commands import benchmark, cli

    cli.run(benchmark.main, benchmark.define_flags)
