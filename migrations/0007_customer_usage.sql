-- Usage aggregates move out of `customers` into a narrow table of their own.
--
-- An UPDATE that changes an indexed column writes a new entry into every index of the table.
-- With usage and profile in one row, each event's usage update wrote ~19 index entries
-- (13 sort indexes, email, trigram name, metadata GIN, parent, primary key, unique key) and
-- carried the whole ~40-column row through the count trigger's transition tables. Now a usage
-- update writes the usage row and its 10 sort indexes only, and a profile write never touches
-- the usage indexes. Reads see both through the view `customer_rows`; a sort on a usage
-- field walks customer_usage's index and joins customers by primary key (and the other way
-- round for profile fields): still one index scan per page, at any depth.
--
-- Liveness (fold.py, REMOVE_DEAD): a customer lives while the newest change applied to it is
-- newer than its tombstone: greatest(customers.last_event_at, customer_usage.last_active),
-- where last_event_at now records profile and subscription changes only.

CREATE TABLE customer_usage (
    organization_id     uuid        NOT NULL,
    id                  uuid        NOT NULL,
    -- Copied from the customer (never writable), so that the sort indexes lead with it.
    environment         text        NOT NULL,
    first_seen          timestamptz,
    last_active         timestamptz,
    active_days         integer     NOT NULL DEFAULT 0 CHECK (active_days >= 0),
    number_of_requests  bigint      NOT NULL DEFAULT 0 CHECK (number_of_requests >= 0),
    prompt_tokens       bigint      NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens   bigint      NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    total_tokens        bigint      NOT NULL DEFAULT 0 CHECK (total_tokens >= 0),
    total_cost          numeric     NOT NULL DEFAULT 0 CHECK (total_cost >= 0),
    latency_sum         double precision NOT NULL DEFAULT 0,
    latency_count       bigint      NOT NULL DEFAULT 0,
    ttft_sum            double precision NOT NULL DEFAULT 0,
    ttft_count          bigint      NOT NULL DEFAULT 0,
    average_latency     double precision GENERATED ALWAYS AS
        (CASE WHEN latency_count > 0 THEN latency_sum / latency_count END) STORED,
    average_ttft        double precision GENERATED ALWAYS AS
        (CASE WHEN ttft_count > 0 THEN ttft_sum / ttft_count END) STORED,
    PRIMARY KEY (organization_id, id)
    -- No foreign key: every row is made by the insert trigger below and removed by the
    -- delete trigger (a per-row check would cost what 0005 measured for daily_usage).
);

INSERT INTO customer_usage (organization_id, id, environment, first_seen, last_active, active_days, number_of_requests,
                            prompt_tokens, completion_tokens, total_tokens, total_cost, latency_sum, latency_count,
                            ttft_sum, ttft_count)
SELECT organization_id, id, environment, first_seen, last_active, active_days, number_of_requests, prompt_tokens,
       completion_tokens, total_tokens, total_cost, latency_sum, latency_count, ttft_sum, ttft_count
FROM customers;

-- The keyset indexes of the usage sort fields (service/core/query.py SORT_FIELDS), `id` last.
CREATE INDEX customer_usage_sort_first_seen ON customer_usage
    (organization_id, environment, coalesce(first_seen, '-infinity'::timestamptz), id);
CREATE INDEX customer_usage_sort_last_active ON customer_usage
    (organization_id, environment, coalesce(last_active, '-infinity'::timestamptz), id);
CREATE INDEX customer_usage_sort_active_days ON customer_usage (organization_id, environment, active_days, id);
CREATE INDEX customer_usage_sort_requests ON customer_usage (organization_id, environment, number_of_requests, id);
CREATE INDEX customer_usage_sort_prompt_tokens ON customer_usage (organization_id, environment, prompt_tokens, id);
CREATE INDEX customer_usage_sort_completion_tokens ON customer_usage
    (organization_id, environment, completion_tokens, id);
CREATE INDEX customer_usage_sort_tokens ON customer_usage (organization_id, environment, total_tokens, id);
CREATE INDEX customer_usage_sort_cost ON customer_usage (organization_id, environment, total_cost, id);
CREATE INDEX customer_usage_sort_latency ON customer_usage
    (organization_id, environment, coalesce(average_latency, '-infinity'::float8), id);
CREATE INDEX customer_usage_sort_ttft ON customer_usage
    (organization_id, environment, coalesce(average_ttft, '-infinity'::float8), id);

-- Before the columns go: liveness now reads last_active from customer_usage, and
-- last_event_at keeps its value (it was already the newest of every change).
DROP INDEX customers_sort_first_seen, customers_sort_last_active, customers_sort_active_days,
    customers_sort_requests, customers_sort_prompt_tokens, customers_sort_completion_tokens, customers_sort_tokens,
    customers_sort_cost, customers_sort_latency, customers_sort_ttft;
ALTER TABLE customers
    DROP COLUMN average_latency, DROP COLUMN average_ttft,
    DROP COLUMN first_seen, DROP COLUMN last_active, DROP COLUMN active_days, DROP COLUMN number_of_requests,
    DROP COLUMN prompt_tokens, DROP COLUMN completion_tokens, DROP COLUMN total_tokens, DROP COLUMN total_cost,
    DROP COLUMN latency_sum, DROP COLUMN latency_count, DROP COLUMN ttft_sum, DROP COLUMN ttft_count;

-- Every customer has its usage row from the statement that creates it (API or fold).
CREATE FUNCTION tally_insert_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO customer_usage (organization_id, id, environment)
    SELECT organization_id, id, environment FROM new_rows;
    RETURN NULL;
END $$;
CREATE TRIGGER customers_insert_usage AFTER INSERT ON customers
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_insert_usage();

CREATE OR REPLACE FUNCTION tally_delete_children() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM customer_usage u USING old_rows o WHERE u.organization_id = o.organization_id AND u.id = o.id;
    DELETE FROM daily_usage d USING old_rows o WHERE d.organization_id = o.organization_id AND d.customer_id = o.id;
    DELETE FROM budget_alerts a USING old_rows o WHERE a.organization_id = o.organization_id AND a.customer_id = o.id;
    RETURN NULL;
END $$;

-- What every read sees: one row per customer, profile and usage. Joined on environment too,
-- so that a filter on the customer's environment also bounds the usage index (and `usage_id`
-- is the usage row's own id: the tie-break a usage sort's keyset compares, inside its index).
CREATE VIEW customer_rows AS
SELECT c.*, u.first_seen, u.last_active, u.active_days, u.number_of_requests, u.prompt_tokens, u.completion_tokens,
       u.total_tokens, u.total_cost, u.latency_sum, u.latency_count, u.ttft_sum, u.ttft_count, u.average_latency,
       u.average_ttft, u.id AS usage_id
FROM customers c
JOIN customer_usage u ON u.organization_id = c.organization_id AND u.environment = c.environment AND u.id = c.id;

ANALYZE customer_usage;
