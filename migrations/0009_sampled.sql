-- A task the server picked for a proof check is recorded 'sampled': it is paid only once
-- its verdict says 'verified'. Before, such a receipt was recorded 'unchecked' (payable)
-- and turned into the verdict later, so a check lost on the way (a crash, a verdict the
-- database refused) left the task payable unchecked. Settlement now pays only 'verified'
-- and 'unchecked' receipts. NOT VALID + VALIDATE: the existing rows are scanned without
-- holding off writers.
ALTER TABLE receipts DROP CONSTRAINT receipts_verification_check;
ALTER TABLE receipts ADD CONSTRAINT receipts_verification_check
    CHECK (verification IN ('unchecked', 'sampled', 'verified', 'failed', 'unverifiable')) NOT VALID;
ALTER TABLE receipts VALIDATE CONSTRAINT receipts_verification_check;
-- The unpaid picked tasks, oldest first, for the operator's alert (`/metrics`
-- ludus_oldest_sampled_seconds): a task waits there only while its check is owed.
CREATE INDEX receipts_sampled ON receipts (created_at) WHERE verification = 'sampled' AND epoch IS NULL;
