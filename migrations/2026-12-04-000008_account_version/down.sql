DROP TRIGGER accounts_version ON accounts;
DROP FUNCTION accounts_bump_version();
ALTER TABLE accounts DROP COLUMN version;
