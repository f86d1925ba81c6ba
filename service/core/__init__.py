"""The domain: customers, the list query, events and the fold. Imports only the standard
library, asyncpg, pydantic and orjson (import-linter checks it)."""
