"""`python -m fednano_jax.deploy`: the command lives in `fednano_jax/commands/deploy.py`."""

if __name__ == "__main__":
    from fednano_jax.commands import cli, deploy

    cli.run(deploy.main, deploy.define_flags)
