"""The store: how the domain is kept in PostgreSQL (plain SQL beside the functions that run it)."""
