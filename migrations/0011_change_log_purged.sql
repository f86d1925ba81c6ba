-- How far housekeeping has purged the change log, per organization and environment: the
-- newest position (xid, seq) it deleted. A change feed client resuming at a position below it
-- may have missed changes that are gone, and is told to resync by listing
-- (service/store/changefeed.py); one above it has missed nothing, however old it is.
CREATE TABLE customer_changes_purged (
    organization_id uuid   NOT NULL,
    environment     text   NOT NULL,
    xid             xid8   NOT NULL,
    seq             bigint NOT NULL,
    PRIMARY KEY (organization_id, environment)
);
