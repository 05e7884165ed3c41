DROP TABLE account_leases;
DROP TABLE reconcile_flags;
