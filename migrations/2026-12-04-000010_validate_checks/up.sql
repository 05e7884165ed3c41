-- The checks added NOT VALID by the previous migration, checked against the
-- rows stored before it. Apart from it: validation holds only a SHARE UPDATE
-- EXCLUSIVE lock, so fills keep being written while it scans.
ALTER TABLE entries VALIDATE CONSTRAINT entries_state;
ALTER TABLE entries VALIDATE CONSTRAINT entries_values;
ALTER TABLE protection_legs VALIDATE CONSTRAINT protection_legs_state;
ALTER TABLE protection_legs VALIDATE CONSTRAINT protection_legs_values;
