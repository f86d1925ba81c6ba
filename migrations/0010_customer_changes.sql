-- The change log: one row per transaction and (organization, environment) that changed
-- customers, written by the transaction itself (service/store/apply.py, for events and API
-- writes alike), so a change is logged exactly when it commits and never otherwise.
--
-- Readers take the rows whose transaction id is below their snapshot's xmin: every
-- transaction below it has ended, so no row can appear there later, and a reader that
-- remembers the (xid, seq) it reached misses nothing (service/store/changelog.py). The same
-- transaction NOTIFYs tally_changes with 'organization:environment', delivered at its commit:
-- what tells every API process that a cached response of that organization and environment
-- may have changed, and a live stream that there is more to read.
CREATE TABLE customer_changes (
    organization_id      uuid        NOT NULL,
    environment          text        NOT NULL,
    xid                  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    seq                  bigint      GENERATED ALWAYS AS IDENTITY,
    -- The customers changed, in parallel arrays: their ids, identifiers, and one letter each
    -- for what happened to them: c (created), u (updated), d (deleted).
    customer_ids         uuid[]      NOT NULL,
    customer_identifiers text[]      NOT NULL,
    kinds                text        NOT NULL,
    changed_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, environment, xid, seq),
    CHECK (kinds ~ '^[cud]+$'),
    CHECK (cardinality(customer_ids) = length(kinds) AND cardinality(customer_identifiers) = length(kinds))
);

-- Retention: housekeeping deletes rows older than the feed keeps.
CREATE INDEX customer_changes_changed_at ON customer_changes (changed_at);
