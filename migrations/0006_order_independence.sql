-- Order independence: the state after a set of events does not depend on the order in which
-- they arrive, how they are batched, or how many consumers fold them (DESIGN.md, "Order
-- independence"; service/core/fold.py states the rules and how each is kept).

-- 1. Organizations are resolved by id whenever the text reads as a UUID, so a name that reads
--    as one could never be addressed by name and could once shadow another organization's id.
--    NOT VALID: enforced for every new or renamed row without failing on a legacy one (the
--    resolver no longer lets such a name shadow anything anyway).
ALTER TABLE organizations ADD CONSTRAINT organizations_name_not_uuid
    CHECK (regexp_replace(lower(name), 'urn:|uuid:|[{}_[:space:]-]', '', 'g') !~ '^[0-9a-f]{32}$') NOT VALID;

-- 2. The 'ops' scope: broker-wide operator statistics. Not implied by 'admin' (an organization's
--    admin must not see other tenants' traffic); granted only by whoever runs `tally keys create`.
ALTER TABLE api_keys DROP CONSTRAINT api_keys_scopes_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_scopes_check
    CHECK (scopes <@ ARRAY['read', 'write', 'admin', 'ops']::text[]);

-- 3. Versions. A write's version is the text '<class>|<microseconds since 0001-01-01 UTC, 19
--    digits>|<source>|<event id>': compared bytewise (COLLATE "C", as Python compares str), the
--    newest event time wins, a tie goes to the greater (source, id), and class 1 (a
--    customer.upserted or an API write) beats class 0 (a usage event's name/email hint).
CREATE FUNCTION tally_micros(at timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (extract(epoch FROM at) * 1000000)::bigint + 62135596800000000
$$;

CREATE FUNCTION tally_version_micros(version text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT split_part(version, '|', 2)::bigint
$$;

-- Per field, the newer of two version maps.
CREATE FUNCTION tally_merge_versions(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT old || coalesce((
        SELECT jsonb_object_agg(n.key, n.value) FROM jsonb_each_text(new) n
        WHERE n.value COLLATE "C" > coalesce(old ->> n.key, '') COLLATE "C"), '{}'::jsonb)
$$;

-- The best (newest) usage hint per field, {field: [version, value]}: a hint ranks below any
-- write, so a write undone by a later-arriving deletion gives the field back to it.
CREATE FUNCTION tally_merge_hints(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT old || coalesce((
        SELECT jsonb_object_agg(n.key, n.value) FROM jsonb_each(new) n
        WHERE (n.value ->> 0) COLLATE "C" > coalesce(old -> n.key ->> 0, '') COLLATE "C"), '{}'::jsonb)
$$;

-- 4. Customers: a version per profile field (last writer wins per field, by event time), and
--    the time of the newest change applied to the customer (usage, profile, subscription, API
--    write): a deletion at or after it removes the customer, an older one only what it predates.
ALTER TABLE customers
    ADD COLUMN profile_versions jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN profile_hints jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN last_event_at timestamptz;

-- Existing rows: every field that holds a value was written at the newest profile time known.
UPDATE customers SET
    last_event_at = coalesce(greatest(last_active, profile_event_time), created_at),
    profile_versions = (
        SELECT coalesce(jsonb_object_agg(f.name, '1|' || lpad(tally_micros(coalesce(profile_event_time, updated_at))::text, 19, '0') || '||'), '{}'::jsonb)
        FROM (VALUES
            ('name', name IS NOT NULL), ('first_name', first_name IS NOT NULL), ('last_name', last_name IS NOT NULL),
            ('email', email IS NOT NULL), ('phone', phone IS NOT NULL), ('customer_type', customer_type IS NOT NULL),
            ('status', status <> 'active'), ('parent_customer_id', parent_customer_id IS NOT NULL),
            ('address_line1', address_line1 IS NOT NULL), ('address_line2', address_line2 IS NOT NULL),
            ('address_city', address_city IS NOT NULL), ('address_state', address_state IS NOT NULL),
            ('address_postal_code', address_postal_code IS NOT NULL), ('address_country', address_country IS NOT NULL),
            ('metadata', metadata <> '{}'::jsonb), ('stripe_customer_id', stripe_customer_id IS NOT NULL),
            ('application_id', application_id IS NOT NULL), ('last_transaction_amount', last_transaction_amount IS NOT NULL),
            ('last_purchase_date', last_purchase_date IS NOT NULL), ('total_budget', total_budget IS NOT NULL),
            ('period_budget', period_budget IS NOT NULL), ('budget_duration', budget_duration IS NOT NULL)
        ) AS f(name, present)
        WHERE f.present);
ALTER TABLE customers DROP COLUMN profile_event_time;
-- A row inserted by anything but the fold (which marks its provisional rows with NULL) was
-- written when it was inserted.
ALTER TABLE customers ALTER COLUMN last_event_at SET DEFAULT now();

-- 5. Tombstones: a deletion at T makes every event for that customer stamped at or before T
--    stale, whenever it arrives. Kept for the dedupe window (an older event is refused anyway).
CREATE TABLE customer_tombstones (
    organization_id     uuid        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    environment         text        NOT NULL,
    customer_identifier text        NOT NULL,
    deleted_at          timestamptz NOT NULL,
    PRIMARY KEY (organization_id, environment, customer_identifier)
);

-- 6. The dedupe table is also the journal of the retention window: each event's time and
--    customer, and a usage event's amounts. A deletion that arrives after newer usage was
--    applied recomputes the customer from the journal rows after it (all of them are inside
--    the window, because an older deletion is refused). Purged by event time, per organization.
ALTER TABLE processed_events
    ADD COLUMN event_time        timestamptz,
    ADD COLUMN environment       text,
    ADD COLUMN subject           text,
    ADD COLUMN requests          bigint,
    ADD COLUMN prompt_tokens     bigint,
    ADD COLUMN completion_tokens bigint,
    ADD COLUMN total_tokens      bigint,
    ADD COLUMN cost              numeric,
    ADD COLUMN latency           double precision,
    ADD COLUMN ttft              double precision;
-- Rows from before this migration carry no amounts; their arrival time stands in for the event
-- time, which only decides when they are purged.
UPDATE processed_events SET event_time = processed_at;
ALTER TABLE processed_events ALTER COLUMN event_time SET NOT NULL, DROP COLUMN processed_at;
CREATE INDEX processed_events_time ON processed_events (organization_id, event_time);

-- 7. Subscriptions belong to one customer: keyed by it (so the same subscription id in two
--    environments, or for two customers, are two rows), with the version of the change applied.
ALTER TABLE subscriptions DROP CONSTRAINT subscriptions_pkey;
ALTER TABLE subscriptions ADD PRIMARY KEY (organization_id, customer_id, id);
DROP INDEX subscriptions_customer;
ALTER TABLE subscriptions ADD COLUMN source_version text;
UPDATE subscriptions SET source_version = '1|' || lpad(tally_micros(source_time)::text, 19, '0') || '||';
