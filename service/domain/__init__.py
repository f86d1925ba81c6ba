"""The domain: tally's rules in plain Python (no database, broker or web framework)."""
