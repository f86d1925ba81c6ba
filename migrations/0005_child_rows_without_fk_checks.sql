-- The fold inserts up to a thousand daily rows per batch; the foreign key's per-row check
-- cost ~190 µs each here (measured: 11.6 s of a 20.9 s fold run, vs 0.4 s without it).
-- The fold creates a customer before any of its child rows in the same transaction, so
-- the check guards nothing it does; deleting a customer still removes its children, now
-- by one statement-level trigger instead of per-row cascades.
ALTER TABLE daily_usage DROP CONSTRAINT daily_usage_organization_id_customer_id_fkey;
ALTER TABLE budget_alerts DROP CONSTRAINT budget_alerts_organization_id_customer_id_fkey;

CREATE FUNCTION tally_delete_children() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM daily_usage d USING old_rows o WHERE d.organization_id = o.organization_id AND d.customer_id = o.id;
    DELETE FROM budget_alerts a USING old_rows o WHERE a.organization_id = o.organization_id AND a.customer_id = o.id;
    RETURN NULL;
END $$;

CREATE TRIGGER customers_delete_children AFTER DELETE ON customers
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tally_delete_children();

-- Orphans cannot exist yet (the foreign keys held until now); nothing to clean up.
