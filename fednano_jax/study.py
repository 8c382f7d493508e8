"""`python -m fednano_jax.study`: the command lives in `fednano_jax/commands/study.py`."""

if __name__ == "__main__":
    from fednano_jax.commands import study, cli

    cli.run(study.main, study.define_flags)
