-- Customer counts per (organization, environment, status), kept exact by statement-level
-- triggers, so an unfiltered (or status-filtered) list answers `count` by summing a few rows
-- instead of scanning hundreds of thousands. Writers only ever INSERT delta rows (never
-- update a shared counter row), so concurrent consumers and API writes never wait on each
-- other here; consumers compact the deltas periodically (service/customers.py).
CREATE TABLE customer_counts (
    organization_id uuid   NOT NULL,
    environment     text   NOT NULL,
    status          text   NOT NULL,
    delta           bigint NOT NULL
);
CREATE INDEX customer_counts_key ON customer_counts (organization_id, environment, status);

CREATE FUNCTION tally_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO customer_counts
    SELECT organization_id, environment, status, count(*) FROM new_rows GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;

CREATE FUNCTION tally_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO customer_counts
    SELECT organization_id, environment, status, -count(*) FROM old_rows GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;

-- Only a status change moves a customer between counts (environment is not writable).
CREATE FUNCTION tally_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO customer_counts
    SELECT organization_id, environment, status, sum(d) FROM (
        SELECT n.organization_id, n.environment, n.status, 1 AS d
        FROM new_rows n JOIN old_rows o ON o.organization_id = n.organization_id AND o.id = n.id
        WHERE o.status <> n.status
        UNION ALL
        SELECT o.organization_id, o.environment, o.status, -1
        FROM new_rows n JOIN old_rows o ON o.organization_id = n.organization_id AND o.id = n.id
        WHERE o.status <> n.status
    ) changes
    GROUP BY 1, 2, 3;
    RETURN NULL;
END $$;

CREATE TRIGGER customers_count_insert AFTER INSERT ON customers
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_count_inserted();
CREATE TRIGGER customers_count_delete AFTER DELETE ON customers
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_count_deleted();
CREATE TRIGGER customers_count_update AFTER UPDATE ON customers
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_count_updated();

-- The triggers exist (and hold their lock on customers) before the existing rows are counted.
INSERT INTO customer_counts
SELECT organization_id, environment, status, count(*) FROM customers GROUP BY 1, 2, 3;
