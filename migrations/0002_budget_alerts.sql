-- Budget threshold alerts: an outbox. The fold inserts a row in the batch's transaction the
-- first time a customer's usage reaches a threshold within a period (the primary key makes
-- it once per customer, period and threshold, whatever is redelivered); a relay publishes
-- unpublished rows after the commit and marks them, retrying until the broker confirms.
CREATE TABLE budget_alerts (
    organization_id uuid        NOT NULL,
    customer_id     uuid        NOT NULL,
    threshold       text        NOT NULL CHECK (threshold IN ('period_80', 'period_100', 'total_100')),
    -- '-infinity' for the lifetime budget (and for a period budget without a duration).
    period_start    timestamptz NOT NULL,
    period_end      timestamptz,
    budget          numeric     NOT NULL,
    usage           numeric     NOT NULL,
    crossed_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    PRIMARY KEY (organization_id, customer_id, threshold, period_start),
    FOREIGN KEY (organization_id, customer_id) REFERENCES customers (organization_id, id) ON DELETE CASCADE
);
CREATE INDEX budget_alerts_unpublished ON budget_alerts (crossed_at) WHERE published_at IS NULL;
