-- Keyset indexes for the remaining sort fields of the list query, so that every field in
-- service/query.py SORT_FIELDS pages by index scan at any depth.
CREATE INDEX customers_sort_status ON customers (organization_id, environment, status, id);
CREATE INDEX customers_sort_prompt_tokens ON customers (organization_id, environment, prompt_tokens, id);
CREATE INDEX customers_sort_completion_tokens ON customers (organization_id, environment, completion_tokens, id);
CREATE INDEX customers_sort_total_budget ON customers
    (organization_id, environment, coalesce(total_budget, '-infinity'::numeric), id);
CREATE INDEX customers_sort_period_budget ON customers
    (organization_id, environment, coalesce(period_budget, '-infinity'::numeric), id);
