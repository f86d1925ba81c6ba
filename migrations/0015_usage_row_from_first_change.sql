-- A customer's usage row is written once, with its first values, instead of twice.
--
-- The insert trigger (0007) gave every new customer an empty usage row, and the change that
-- made the customer then updated it: an UPDATE of every indexed column writes a new row
-- version and a new entry in each of customer_usage's eleven indexes, so a new customer cost
-- its usage indexes twice (bench/foldcost.py: the fold's UPDATE_USAGE and INSERT_CUSTOMERS
-- were its two largest statements). A provisional row (last_event_at NULL: made by the fold
-- or by an API write for the change it is about to apply) now gets its usage row from that
-- change, in service/store/apply.py (INSERT_USAGE), in the same transaction; any other
-- customer insert still gets an empty one here.
CREATE OR REPLACE FUNCTION tally_insert_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO customer_usage (organization_id, id, environment)
    SELECT organization_id, id, environment FROM new_rows WHERE last_event_at IS NOT NULL;
    RETURN NULL;
END $$;
