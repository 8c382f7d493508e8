"""`python -m fednano_jax.data.partition_stats`: the command lives in `fednano_jax/commands/partition_stats.py`."""

if __name__ == "__main__":
    from fednano_jax.commands import cli, partition_stats

    cli.run(partition_stats.main, partition_stats.define_flags)
