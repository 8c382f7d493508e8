"""`python -m fednano_jax.memory_plan`: the command lives in `fednano_jax/commands/memory_plan.py`."""

if __name__ == "__main__":
    from fednano_jax.commands import memory_plan, cli

    cli.run(memory_plan.main, memory_plan.define_flags)
