"""`python -m fednano_jax.convert_pth`: the command lives in `fednano_jax/commands/convert_pth.py`."""

if __name__ == "__main__":
    from fednano_jax.commands import cli, convert_pth

    cli.run(convert_pth.main, convert_pth.define_flags)
