"""Privacy beyond "no raw data leaves the client": client-level differential privacy (dp.py, accountant.py)."""
