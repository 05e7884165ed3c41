-- Validation changes no rule and cannot be undone; the previous migration's
-- down.sql restores the original checks.
SELECT 1;
