-- A check that could not run (a verifier error, a reference it cannot load) is recorded as
-- 'unverifiable': never payable, never counted as verified, and no fault of the node. A
-- later real verdict (verified or failed) replaces it.
ALTER TABLE verifications DROP CONSTRAINT verifications_outcome_check;
ALTER TABLE verifications ADD CONSTRAINT verifications_outcome_check
    CHECK (outcome IN ('verified', 'failed', 'unverifiable'));
ALTER TABLE receipts DROP CONSTRAINT receipts_verification_check;
ALTER TABLE receipts ADD CONSTRAINT receipts_verification_check
    CHECK (verification IN ('unchecked', 'verified', 'failed', 'unverifiable'));
