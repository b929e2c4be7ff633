-- A node whose delivered tokens were recorded unchecked (`unverifiable`) is checked on
-- every task until one is verified; a restarted server reads that back from here when the
-- node joins (`Store::owes_a_verified_task`), so the lookup is by node.
CREATE INDEX delivery_checks_unverifiable ON delivery_checks (node_address, checked_at)
    WHERE outcome = 'unverifiable';
-- ... and compares with the node's newest verified task.
CREATE INDEX verifications_node_verified ON verifications (node_address, checked_at)
    WHERE outcome = 'verified';
