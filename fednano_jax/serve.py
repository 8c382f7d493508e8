"""`python -m fednano_jax.serve`: the command lives in `fednano_jax/commands/serve.py`."""

if __name__ == "__main__":
    from fednano_jax.commands import cli, serve

    cli.run(serve.main, serve.define_flags)
