-- tally's data model. Every table is keyed by organization_id first, so that the schema
-- can be distributed by organization (Citus) and so that no query can forget the tenant.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE organizations (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text        NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A key is "<prefix>.<secret>"; only sha256(secret) is stored. The prefix is the lookup
-- handle (and the x-client-key of the header-pair form); it is not a secret.
CREATE TABLE api_keys (
    prefix          text        PRIMARY KEY,
    organization_id uuid        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    secret_hash     bytea       NOT NULL,
    scopes          text[]      NOT NULL CHECK (scopes <@ ARRAY['read', 'write', 'admin']::text[]),
    environment     text        NOT NULL DEFAULT 'prod' CHECK (environment IN ('prod', 'test')),
    name            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);
CREATE INDEX api_keys_organization ON api_keys (organization_id);

-- One row of current facts per customer: profile, budgets, and the usage aggregates
-- (kept in the same row so that a list sorted by any aggregate is one index scan).
CREATE TABLE customers (
    organization_id         uuid        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    id                      uuid        NOT NULL DEFAULT gen_random_uuid(),
    environment             text        NOT NULL DEFAULT 'prod' CHECK (environment IN ('prod', 'test')),
    customer_identifier     text        NOT NULL CHECK (length(customer_identifier) BETWEEN 1 AND 255),

    name                    text,
    first_name              text,
    last_name               text,
    email                   text,
    phone                   text,
    customer_type           text,
    status                  text        NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'draft', 'blacklisted', 'deactivated', 'archived')),
    parent_customer_id      uuid,
    address_line1           text,
    address_line2           text,
    address_city            text,
    address_state           text,
    address_postal_code     text,
    address_country         text,
    metadata                jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    stripe_customer_id      text,
    application_id          text,
    last_transaction_amount numeric,
    last_purchase_date      timestamptz,

    total_budget            numeric     CHECK (total_budget >= 0),
    period_budget           numeric     CHECK (period_budget >= 0),
    budget_duration         text        CHECK (budget_duration IN ('daily', 'weekly', 'monthly', 'yearly')),

    first_seen              timestamptz,
    last_active             timestamptz,
    active_days             integer     NOT NULL DEFAULT 0 CHECK (active_days >= 0),
    number_of_requests      bigint      NOT NULL DEFAULT 0 CHECK (number_of_requests >= 0),
    prompt_tokens           bigint      NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens       bigint      NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    total_tokens            bigint      NOT NULL DEFAULT 0 CHECK (total_tokens >= 0),
    total_cost              numeric     NOT NULL DEFAULT 0 CHECK (total_cost >= 0),
    -- Averages are kept as sums and counts (exact to fold, order-independent) and derived.
    latency_sum             double precision NOT NULL DEFAULT 0,
    latency_count           bigint      NOT NULL DEFAULT 0,
    ttft_sum                double precision NOT NULL DEFAULT 0,
    ttft_count              bigint      NOT NULL DEFAULT 0,
    average_latency         double precision GENERATED ALWAYS AS
        (CASE WHEN latency_count > 0 THEN latency_sum / latency_count END) STORED,
    average_ttft            double precision GENERATED ALWAYS AS
        (CASE WHEN ttft_count > 0 THEN ttft_sum / ttft_count END) STORED,

    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    -- Time of the newest customer.upserted event applied: an older one arriving late does
    -- not overwrite it, and a customer.deleted older than it (or than last_active) is void.
    profile_event_time      timestamptz,

    PRIMARY KEY (organization_id, id),
    UNIQUE (organization_id, environment, customer_identifier),
    FOREIGN KEY (organization_id, parent_customer_id)
        REFERENCES customers (organization_id, id) ON DELETE SET NULL (parent_customer_id)
);

-- List indexes: one per sortable column, (tenant, environment, sort expression, id), so a
-- page in either direction is an index scan that stops after LIMIT rows, and the keyset
-- cursor is a row comparison on the same tuple. The expressions must match
-- service/query.py's SORT_FIELDS exactly, or the planner cannot use them.
CREATE INDEX customers_sort_name ON customers (organization_id, environment, coalesce(name, ''), id);
CREATE INDEX customers_sort_email ON customers (organization_id, environment, coalesce(email, ''), id);
CREATE INDEX customers_sort_created ON customers (organization_id, environment, created_at, id);
CREATE INDEX customers_sort_updated ON customers (organization_id, environment, updated_at, id);
CREATE INDEX customers_sort_first_seen ON customers
    (organization_id, environment, coalesce(first_seen, '-infinity'::timestamptz), id);
CREATE INDEX customers_sort_last_active ON customers
    (organization_id, environment, coalesce(last_active, '-infinity'::timestamptz), id);
CREATE INDEX customers_sort_active_days ON customers (organization_id, environment, active_days, id);
CREATE INDEX customers_sort_requests ON customers (organization_id, environment, number_of_requests, id);
CREATE INDEX customers_sort_tokens ON customers (organization_id, environment, total_tokens, id);
CREATE INDEX customers_sort_cost ON customers (organization_id, environment, total_cost, id);
CREATE INDEX customers_sort_latency ON customers
    (organization_id, environment, coalesce(average_latency, '-infinity'::float8), id);
CREATE INDEX customers_sort_ttft ON customers
    (organization_id, environment, coalesce(average_ttft, '-infinity'::float8), id);
CREATE INDEX customers_sort_identifier ON customers (organization_id, environment, customer_identifier, id);
-- Filters.
CREATE INDEX customers_email_ci ON customers (organization_id, lower(email));
CREATE INDEX customers_name_trgm ON customers USING gin (name gin_trgm_ops);
CREATE INDEX customers_metadata ON customers USING gin (metadata jsonb_path_ops);
CREATE INDEX customers_parent ON customers (organization_id, parent_customer_id)
    WHERE parent_customer_id IS NOT NULL;

-- Usage per customer and UTC day: active_days, budget periods and the usage time series.
CREATE TABLE daily_usage (
    organization_id   uuid    NOT NULL,
    customer_id       uuid    NOT NULL,
    day               date    NOT NULL,
    requests          bigint  NOT NULL DEFAULT 0,
    prompt_tokens     bigint  NOT NULL DEFAULT 0,
    completion_tokens bigint  NOT NULL DEFAULT 0,
    total_tokens      bigint  NOT NULL DEFAULT 0,
    cost              numeric NOT NULL DEFAULT 0,
    latency_sum       double precision NOT NULL DEFAULT 0,
    latency_count     bigint  NOT NULL DEFAULT 0,
    ttft_sum          double precision NOT NULL DEFAULT 0,
    ttft_count        bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, customer_id, day),
    FOREIGN KEY (organization_id, customer_id) REFERENCES customers (organization_id, id) ON DELETE CASCADE
);

CREATE TABLE subscriptions (
    organization_id       uuid        NOT NULL,
    id                    text        NOT NULL,
    customer_id           uuid        NOT NULL,
    status                text        NOT NULL,
    current_period_start  timestamptz,
    current_period_end    timestamptz,
    plan_stripe_price_id  text,
    plan_name             text,
    plan_amount           bigint,
    plan_currency         text,
    plan_interval         text,
    -- The event time of the last applied change: an older, late event never overwrites it.
    source_time           timestamptz NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    FOREIGN KEY (organization_id, customer_id) REFERENCES customers (organization_id, id) ON DELETE CASCADE
);
CREATE INDEX subscriptions_customer ON subscriptions (organization_id, customer_id);

-- Idempotency: an event applies at most once per (organization, source, id) while its
-- row is kept (the retention window); older events are refused as too old.
CREATE TABLE processed_events (
    organization_id uuid        NOT NULL,
    source          text        NOT NULL,
    event_id        text        NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, source, event_id)
);
CREATE INDEX processed_events_age ON processed_events (processed_at);

-- Per-installation secrets made at migrate time (the cursor signing key), so every API
-- replica shares them without configuration.
CREATE TABLE instance_secrets (
    name  text  PRIMARY KEY,
    value bytea NOT NULL
);
INSERT INTO instance_secrets (name, value)
VALUES ('cursor_hmac', decode(md5(gen_random_uuid()::text) || md5(gen_random_uuid()::text), 'hex'));

-- Budget periods (UTC): the current period's bounds and the cost inside it, computed on
-- read so that a period rolls over without any job. Weeks start on Monday (ISO).
CREATE FUNCTION tally_period_start(duration text, at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT date_trunc(CASE duration WHEN 'daily' THEN 'day' WHEN 'weekly' THEN 'week'
                                    WHEN 'monthly' THEN 'month' WHEN 'yearly' THEN 'year' END, at, 'UTC')
$$;

CREATE FUNCTION tally_period_end(duration text, at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT ((tally_period_start(duration, at) AT TIME ZONE 'UTC')
            + CASE duration WHEN 'daily' THEN interval '1 day' WHEN 'weekly' THEN interval '1 week'
                            WHEN 'monthly' THEN interval '1 month' WHEN 'yearly' THEN interval '1 year' END)
           AT TIME ZONE 'UTC'
$$;

-- Without a budget_duration the "period" is the customer's whole life: lifetime cost.
CREATE FUNCTION tally_period_usage(org uuid, customer uuid, duration text, at timestamptz, lifetime numeric)
RETURNS numeric LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN duration IS NULL THEN lifetime ELSE (
        SELECT coalesce(sum(d.cost), 0) FROM daily_usage d
        WHERE d.organization_id = org AND d.customer_id = customer
          AND d.day >= (tally_period_start(duration, at) AT TIME ZONE 'UTC')::date
          AND d.day < (tally_period_end(duration, at) AT TIME ZONE 'UTC')::date) END
$$;
