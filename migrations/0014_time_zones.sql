-- An organization's reporting time zone (an IANA name; UTC unless set). Its days are the days
-- of daily_usage, of usage windows and series; its calendar periods are the budget periods.
-- The fold stamps each usage event's day in the zone the organization has when the event is
-- folded (service/domain/changes.py), so changing the zone leaves days already folded where
-- they are and puts new events on the new zone's days (docs/concepts/time-zones.md).
--
-- The check makes PostgreSQL resolve the name: one it does not know is refused here as well
-- as by the CLI (which also asks Python's zoneinfo, since the fold computes days there).
ALTER TABLE organizations
    ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC'
        CHECK (length(time_zone) <= 64 AND (timestamptz '2000-01-01 00:00+00' AT TIME ZONE time_zone) IS NOT NULL);

-- Budget periods in a zone: a daily period is the zone's day (23 or 25 hours across a
-- daylight-saving change), a month runs from local midnight on the 1st. Without a zone, UTC.
DROP FUNCTION tally_period_usage(uuid, uuid, text, timestamptz, numeric);
DROP FUNCTION tally_period_end(text, timestamptz);
DROP FUNCTION tally_period_start(text, timestamptz);

CREATE FUNCTION tally_period_start(duration text, at timestamptz, zone text DEFAULT 'UTC') RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT date_trunc(CASE duration WHEN 'daily' THEN 'day' WHEN 'weekly' THEN 'week'
                                    WHEN 'monthly' THEN 'month' WHEN 'yearly' THEN 'year' END, at, zone)
$$;

CREATE FUNCTION tally_period_end(duration text, at timestamptz, zone text DEFAULT 'UTC') RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT ((tally_period_start(duration, at, zone) AT TIME ZONE zone)
            + CASE duration WHEN 'daily' THEN interval '1 day' WHEN 'weekly' THEN interval '1 week'
                            WHEN 'monthly' THEN interval '1 month' WHEN 'yearly' THEN interval '1 year' END)
           AT TIME ZONE zone
$$;

-- Without a budget_duration the "period" is the customer's whole life: lifetime cost. With
-- one, the cost of the organization's local days inside the period.
CREATE FUNCTION tally_period_usage(org uuid, customer uuid, duration text, at timestamptz, lifetime numeric)
RETURNS numeric LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN duration IS NULL THEN lifetime ELSE (
        SELECT coalesce(sum(d.cost), 0)
        FROM organizations o, daily_usage d
        WHERE o.id = org AND d.organization_id = org AND d.customer_id = customer
          AND d.day >= (tally_period_start(duration, at, o.time_zone) AT TIME ZONE o.time_zone)::date
          AND d.day < (tally_period_end(duration, at, o.time_zone) AT TIME ZONE o.time_zone)::date) END
$$;
