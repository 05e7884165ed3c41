DROP INDEX IF EXISTS accounts_owner_idx;
DROP TABLE users;
