-- Budget recoveries: the webhook event `alert.budget.recovered` (docs/api/webhooks.md).
--
-- A customer that crossed a period threshold (budget_alerts, 'period_80' or 'period_100')
-- recovers when a later period starts below it. Housekeeping records one row per alert that
-- recovered, after the alerted period ended (service/store/alerts.py record_recoveries): the
-- fold writes nothing for it. The webhook dispatcher reads these rows like the alerts, by the
-- transaction that recorded them (the same cursor, webhook_endpoints.alerts_xid).
CREATE TABLE budget_recoveries (
    organization_id   uuid        NOT NULL,
    customer_id       uuid        NOT NULL,
    -- The alert recovered from: its threshold and its (ended) period.
    threshold         text        NOT NULL,
    period_start      timestamptz NOT NULL,
    period_end        timestamptz NOT NULL,
    -- The customer's period budget, its current period and its usage there when recorded.
    budget            numeric     NOT NULL,
    current_start     timestamptz NOT NULL,
    current_end       timestamptz NOT NULL,
    usage             numeric     NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    xid               xid8        NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (organization_id, customer_id, threshold, period_start),
    -- A customer's deletion deletes its alerts (0007's statement trigger), and so these.
    FOREIGN KEY (organization_id, customer_id, threshold, period_start)
        REFERENCES budget_alerts (organization_id, customer_id, threshold, period_start) ON DELETE CASCADE
);
CREATE INDEX budget_recoveries_xid ON budget_recoveries (organization_id, xid);

-- Housekeeping looks at alerts whose period ended since it last looked.
CREATE INDEX budget_alerts_period_end ON budget_alerts (period_end) WHERE period_end IS NOT NULL;

-- How far housekeeping has looked: alerts whose period ended at or before checked_to are
-- decided. One row; periods that ended before this migration are not looked at.
CREATE TABLE budget_recovery_mark (
    one        boolean     PRIMARY KEY DEFAULT true CHECK (one),
    checked_to timestamptz NOT NULL
);
INSERT INTO budget_recovery_mark (checked_to) VALUES (now());

ALTER TABLE webhook_endpoints DROP CONSTRAINT webhook_endpoints_events_check;
ALTER TABLE webhook_endpoints ADD CONSTRAINT webhook_endpoints_events_check
    CHECK (events <@ ARRAY['customer.created', 'customer.updated', 'customer.deleted', 'alert.budget',
                           'alert.budget.recovered']);
