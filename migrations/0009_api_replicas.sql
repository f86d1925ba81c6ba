-- The live API processes, one row each, refreshed by a heartbeat every second: every limit that
-- must hold across replicas (a key's request rate, an organization's share of the work) is
-- divided by how many are live (service/api/fairness.py). A row not refreshed for a few
-- seconds is a replica gone; the heartbeat deletes rows an hour old.
CREATE TABLE api_replicas (
    id      uuid        PRIMARY KEY,
    seen_at timestamptz NOT NULL
);
