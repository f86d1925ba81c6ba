-- Customers ranked by cost inside the windows dashboards ask for most — the last 7 days, the
-- last 30 days, the current calendar month, each ending today in the organization's time zone
-- — served from maintained sums with their own sort indexes, instead of aggregating the
-- organization's daily rows on every request (service/store/listing.py, the window's fast path).
--
-- Each usage row keeps its customer's cost in the three windows ending on `window_day`. The fold
-- (and every other write of daily_usage: service/store/apply.py) recomputes them from the
-- customer's daily rows of the window, for the local day of its transaction; housekeeping moves
-- every organization's rows to the new day after its local midnight (service/store/windows.py)
-- and then records the day in usage_window_marks. A list uses the sums only while its
-- organization's mark is today and the window asked for is one of these three, ending today.
ALTER TABLE customer_usage
    ADD COLUMN window_day date,
    ADD COLUMN cost_7d    numeric NOT NULL DEFAULT 0,
    ADD COLUMN cost_30d   numeric NOT NULL DEFAULT 0,
    ADD COLUMN cost_month numeric NOT NULL DEFAULT 0;

CREATE INDEX customer_usage_sort_cost_7d ON customer_usage (organization_id, environment, cost_7d, id);
CREATE INDEX customer_usage_sort_cost_30d ON customer_usage (organization_id, environment, cost_30d, id);
CREATE INDEX customer_usage_sort_cost_month ON customer_usage (organization_id, environment, cost_month, id);

-- The local day every usage row of the organization has its window sums for. No row: not yet.
CREATE TABLE usage_window_marks (
    organization_id uuid PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
    day             date NOT NULL
);

-- A customer's cost in the three windows ending on the local day `today`: its daily rows of
-- the window, by primary key (at most 31 of them).
CREATE FUNCTION tally_window_sums(org uuid, customer uuid, today date)
RETURNS TABLE (cost_7d numeric, cost_30d numeric, cost_month numeric)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(sum(d.cost) FILTER (WHERE d.day > today - 7), 0),
           coalesce(sum(d.cost) FILTER (WHERE d.day > today - 30), 0),
           coalesce(sum(d.cost) FILTER (WHERE d.day >= date_trunc('month', today::timestamp)::date), 0)
    FROM daily_usage d
    WHERE d.organization_id = org AND d.customer_id = customer
      AND d.day BETWEEN least(today - 29, date_trunc('month', today::timestamp)::date) AND today
$$;

-- The organization's local day at `at`.
CREATE FUNCTION tally_local_day(zone text, at timestamptz) RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT (at AT TIME ZONE zone)::date
$$;
