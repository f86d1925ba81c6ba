-- Usage per model and provider: per customer, day (of the organization's time zone), model
-- and provider, the same sums as daily_usage, for the usage events that name a model or a
-- provider (service/domain/events.py UsageData). An event without either writes nothing here,
-- so the fold of a batch without them runs no extra statement. '' stands for an absent model
-- or provider (a primary key column cannot be NULL); the reads show it as null.
--
-- Storage per customer and day is bounded by the validated names (at most 64 characters
-- each) and by the events themselves (one row per distinct model and provider a day); the
-- bound on what a response lists (the top models by cost, the rest summed as "other") is
-- applied when it is read, so that it cannot depend on the order events arrive in.
CREATE TABLE daily_model_usage (
    organization_id   uuid             NOT NULL,
    customer_id       uuid             NOT NULL,
    day               date             NOT NULL,
    model             text             NOT NULL,
    provider          text             NOT NULL,
    requests          bigint           NOT NULL DEFAULT 0,
    prompt_tokens     bigint           NOT NULL DEFAULT 0,
    completion_tokens bigint           NOT NULL DEFAULT 0,
    total_tokens      bigint           NOT NULL DEFAULT 0,
    cost              numeric          NOT NULL DEFAULT 0,
    latency_sum       double precision NOT NULL DEFAULT 0,
    latency_count     bigint           NOT NULL DEFAULT 0,
    ttft_sum          double precision NOT NULL DEFAULT 0,
    ttft_count        bigint           NOT NULL DEFAULT 0,
    -- A customer's rows in a range of days are one range scan of the primary key, as for
    -- daily_usage; no foreign key, for the per-row check cost 0005 measured.
    PRIMARY KEY (organization_id, customer_id, day, model, provider)
);

-- The journal keeps each usage event's model and provider, so that the recompute after a
-- late deletion rebuilds these rows from it exactly as it rebuilds daily_usage.
ALTER TABLE processed_events ADD COLUMN model text, ADD COLUMN provider text;

-- A deleted customer's rows go with it: a statement-level trigger of its own (rather than a
-- new version of tally_delete_children), so that it composes with any other migration that
-- redefines that function.
CREATE FUNCTION tally_delete_model_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM daily_model_usage m USING old_rows o
    WHERE m.organization_id = o.organization_id AND m.customer_id = o.id;
    RETURN NULL;
END $$;
CREATE TRIGGER customers_delete_model_usage AFTER DELETE ON customers
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_delete_model_usage();
