"""`python -m fednano_jax.accounting`: the command lives in `fednano_jax/commands/accounting.py`."""

if __name__ == "__main__":
    from fednano_jax.commands import accounting, cli

    cli.run(accounting.main, accounting.define_flags)
