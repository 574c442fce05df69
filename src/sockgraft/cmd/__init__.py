"""The commands: `graft` (graft.py, run.py, status.py, config.py) and `graftd` (graftd.py)."""
