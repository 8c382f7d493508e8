"""`python -m fednano_jax.privacy_audit`: the command lives in `fednano_jax/commands/privacy_audit.py`."""

if __name__ == "__main__":
    from fednano_jax.commands import cli, privacy_audit

    cli.run(privacy_audit.main, privacy_audit.define_flags)
