"""Devices: the clients x model mesh, shardings by rules, multi-host start-up, what XLA planned and how long it compiled."""
