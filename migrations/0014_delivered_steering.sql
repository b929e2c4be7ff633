-- Near-ties forgiven in tokens a node delivered and then failed before its proof
-- (`delivery_checks`) add to the node's steering record like a verified task's, once per
-- check: the format whose reference explained them marks the check as added.
ALTER TABLE delivery_checks
    ADD COLUMN format TEXT,
    ADD COLUMN wide_deviations INTEGER,
    ADD COLUMN ends_passed INTEGER,
    ADD COLUMN tokens_past_end INTEGER;
