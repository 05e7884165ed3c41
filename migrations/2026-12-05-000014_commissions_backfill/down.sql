-- Filling in the fees changes no rule and needs no undoing; the previous
-- migration's down.sql drops the column.
SELECT 1;
