-- An event applies at most once per (organization, environment, source, id): the prod and
-- test environments are separate worlds (as test and live keys are at the payment providers),
-- so a test event must never make a prod event with the same source and id a duplicate.
--
-- Journal rows from before migration 0006 carry no environment; events without one are prod.
UPDATE processed_events SET environment = 'prod' WHERE environment IS NULL;
ALTER TABLE processed_events ALTER COLUMN environment SET NOT NULL;
ALTER TABLE processed_events DROP CONSTRAINT processed_events_pkey;
ALTER TABLE processed_events ADD PRIMARY KEY (organization_id, environment, source, event_id);
