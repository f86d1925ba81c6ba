-- Signed outbound webhooks (service/store/webhooks.py, consumers/webhooks.py).
--
-- An endpoint subscribes one organization's environment to event types. Deliveries are not
-- written by the fold: a dispatcher reads what committed — the change log (migration 0010)
-- and budget_alerts — after the commit, below the snapshot's xmin as the change feed does,
-- and inserts one delivery row per event and endpoint in the transaction that moves the
-- endpoint's cursors, so each event is materialised exactly once per endpoint.
CREATE TABLE webhook_endpoints (
    organization_id   uuid        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    id                uuid        NOT NULL DEFAULT gen_random_uuid(),
    environment       text        NOT NULL CHECK (environment IN ('prod', 'test')),
    url               text        NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    events            text[]      NOT NULL
        CONSTRAINT webhook_endpoints_events_check
        CHECK (events <@ ARRAY['customer.created', 'customer.updated', 'customer.deleted', 'alert.budget'])
        CONSTRAINT webhook_endpoints_events_present CHECK (cardinality(events) >= 1),
    -- Stored as it is: a signing secret must be usable to sign, so it cannot be hashed like an
    -- API key's (docs/api/webhooks.md says so, and that it is not encrypted at rest).
    secret            text        NOT NULL,
    -- After a rotation the previous secret signs too, until previous_expires_at.
    previous_secret   text,
    previous_expires_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- The change log is read after (changes_xid, changes_seq) and the first changes_given
    -- changes of the next row (service/store/changefeed.py Cursor); budget alerts from
    -- alerts_xid on (every alert of a transaction below it is materialised).
    changes_xid       xid8        NOT NULL,
    changes_seq       bigint      NOT NULL DEFAULT 0,
    changes_given     integer     NOT NULL DEFAULT 0,
    alerts_xid        xid8        NOT NULL,
    -- Since when every attempt failed (null after a success); past TALLY_WEBHOOK_DISABLE_AFTER_HOURS
    -- the endpoint is disabled: nothing more is materialised or sent for it.
    failing_since     timestamptz,
    disabled_at       timestamptz,
    PRIMARY KEY (organization_id, id)
);
CREATE INDEX webhook_endpoints_scope ON webhook_endpoints (organization_id, environment);

CREATE TABLE webhook_deliveries (
    organization_id  uuid        NOT NULL,
    endpoint_id      uuid        NOT NULL,
    id               bigint      GENERATED ALWAYS AS IDENTITY,
    -- The event's id, the same for every endpoint: what a receiver dedupes on.
    event_id         text        NOT NULL,
    event_type       text        NOT NULL,
    -- Deliveries of one customer to one endpoint go in id order: a later one waits while an
    -- earlier one is pending.
    customer_id      uuid        NOT NULL,
    -- The body exactly as sent (and signed), the same on every attempt.
    body             text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    state            text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         integer     NOT NULL DEFAULT 0,
    -- When the next attempt may start; while an attempt runs, when its lease ends.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- Retried until then (created_at, or a redelivery's time, plus TALLY_WEBHOOK_RETRY_HOURS).
    give_up_at       timestamptz NOT NULL,
    last_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text,
    delivered_at     timestamptz,
    PRIMARY KEY (endpoint_id, id),
    UNIQUE (endpoint_id, event_id),
    FOREIGN KEY (organization_id, endpoint_id) REFERENCES webhook_endpoints (organization_id, id) ON DELETE CASCADE
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_customer ON webhook_deliveries (endpoint_id, customer_id, id)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (endpoint_id, created_at);
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (created_at) WHERE state <> 'pending';

-- Which transaction recorded each alert: a column default, so the fold runs no statement more.
-- Rows recorded before this migration take its own transaction's id.
ALTER TABLE budget_alerts ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX budget_alerts_xid ON budget_alerts (organization_id, xid);
