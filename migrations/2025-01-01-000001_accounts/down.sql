DROP TABLE secret_key_check;
DROP TABLE accounts;
