//! `sync`'s pool size reads `OCO_DB_POOL_SIZE` like the other binaries and
//! still accepts the older `SYNC_DB_POOL` (here through their flags).
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use clap::Parser;
use sync_bin::Config;

fn parse(extra: &[&str]) -> Config {
    let mut args = vec![
        "sync",
        "--database-url",
        "postgres://x@db/o",
        "--secret-key",
        "k",
    ];
    args.extend_from_slice(extra);
    Config::try_parse_from(args).unwrap()
}

#[test]
fn the_pool_size_takes_the_shared_name_before_the_old_one() {
    assert_eq!(parse(&[]).pool_size(), 8);
    assert_eq!(parse(&["--db-pool", "3"]).pool_size(), 3);
    assert_eq!(
        parse(&["--db-pool", "3", "--db-pool-size", "5"]).pool_size(),
        5
    );
    assert_eq!(parse(&["--db-pool-size", "0"]).pool_size(), 1);
}
