"""`python -m fednano_jax.memory_plan`: the command lives in `fednano_jax/commands/memory_plan.py`."""

if __name__ == "__main__":
    import os

    # Targets are compiled for, never run on: JAX itself runs on this host's CPU, and the GPU and TPU plugins
    # (requirements-aot.txt) are not asked to find devices, which spares their start-up complaints.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

    from fednano_jax.commands import memory_plan, cli

    cli.run(memory_plan.main, memory_plan.define_flags)
