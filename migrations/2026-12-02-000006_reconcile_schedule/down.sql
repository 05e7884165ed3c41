DROP TRIGGER accounts_reconcile_schedule ON accounts;
DROP FUNCTION reconcile_schedule_add();
DROP TABLE reconcile_schedule;
