"""Shared infrastructure: settings, database pools, the broker topology and publisher,
logs, metrics, migrations."""
