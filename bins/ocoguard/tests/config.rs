//! `ocoguard run`'s settings: defaults, the TOML file over them, environment
//! variables over the file; bad files and values refused with messages that
//! name the key, the file and the line; the secret key never shown.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ocoguard::config::{ExchangeKind, LogFormat, OPTIONS, Settings, Source, database_url};

const KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// A temporary folder removed on drop, holding config and key files.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let path = std::env::temp_dir().join(format!(
            "ocoguard-config-{name}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

fn load(path: Option<&Path>, pairs: &[(&str, &str)]) -> Result<Settings, String> {
    Settings::load(path, &env_of(pairs)).map_err(|e| e.to_string())
}

const MINIMAL_ENV: &[(&str, &str)] = &[
    ("DATABASE_URL", "postgres://u:hunter2@db/oco"),
    ("OCO_SECRET_KEY", KEY_HEX),
    ("OCO_EXCHANGE", "testnet"),
];

#[test]
fn environment_alone_gives_the_defaults_for_the_rest() {
    let s = load(None, MINIMAL_ENV).unwrap();
    assert_eq!(s.database_url, "postgres://u:hunter2@db/oco");
    assert_eq!(s.exchange, ExchangeKind::Testnet);
    assert_eq!(s.db_pool_size, 16);
    assert_eq!(s.api_listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.id_namespace, "og");
    assert_eq!(s.log_format, LogFormat::Auto);
    assert_eq!((s.lease_ttl_secs, s.lease_renew_secs), (30, 10));
    assert_eq!(s.max_accounts, 1000);
    assert_eq!(
        (s.accounts_per_connection, s.stream_connect_attempts),
        (100, 250)
    );
    assert_eq!((s.sync_interval_secs, s.sync_startup_delay_secs), (300, 15));
    assert_eq!((s.sync_concurrency, s.sync_weight_budget), (8, 3000));
    assert_eq!(s.gateway_id, None);
    assert_eq!(s.cpu_wakeup_latency_us, None, "not held unless asked for");
    assert_eq!(s.sources["database.url"], Source::Env("DATABASE_URL"));
    assert_eq!(s.sources["sync.interval_secs"], Source::Default);
    let b = s.binance_config().unwrap();
    assert_eq!(b.rest_base, "https://testnet.binance.vision");
}

#[test]
fn the_file_overrides_defaults_and_the_environment_overrides_the_file() {
    let dir = Dir::new("precedence");
    let key = dir.file("key", &format!("{KEY_HEX}\n"));
    let path = dir.file(
        "ocoguard.toml",
        &format!(
            r#"
id_namespace = "file"
[database]
url = "postgres://file@db/oco"
pool_size = 4
secret_key_file = "{}"
[exchange]
kind = "production"
[sync]
interval_secs = 60
concurrency = 2
[gateway]
lease_ttl_secs = 40
cpu_wakeup_latency_us = 10
"#,
            key.display()
        ),
    );
    let s = load(Some(&path), &[]).unwrap();
    assert_eq!(s.database_url, "postgres://file@db/oco");
    assert_eq!(s.db_pool_size, 4);
    assert_eq!(s.exchange, ExchangeKind::Production);
    assert_eq!(s.id_namespace, "file");
    assert_eq!((s.sync_interval_secs, s.sync_concurrency), (60, 2));
    assert_eq!(
        s.sync_startup_delay_secs, 15,
        "not in the file: the default"
    );
    assert_eq!(s.lease_ttl_secs, 40);
    assert_eq!(s.cpu_wakeup_latency_us, Some(10));
    assert_eq!(s.sources["database.url"], Source::File(path.clone()));
    assert_eq!(
        s.sources["database.secret_key_file"],
        Source::File(path.clone())
    );
    assert_eq!(s.sources["sync.startup_delay_secs"], Source::Default);

    let s = load(
        Some(&path),
        &[
            ("DATABASE_URL", "postgres://env@db/oco"),
            ("SYNC_INTERVAL_SECS", "5"),
            ("OCO_EXCHANGE", "testnet"),
            ("OCO_DB_POOL_SIZE", ""), // empty counts as unset
            ("OCO_CPU_WAKEUP_LATENCY_US", "0"),
        ],
    )
    .unwrap();
    assert_eq!(s.cpu_wakeup_latency_us, Some(0));
    assert_eq!(s.database_url, "postgres://env@db/oco");
    assert_eq!(s.sync_interval_secs, 5);
    assert_eq!(s.exchange, ExchangeKind::Testnet);
    assert_eq!(s.db_pool_size, 4, "the file's value stays");
    assert_eq!(s.sync_concurrency, 2, "the file's value stays");
    assert_eq!(
        s.sources["sync.interval_secs"],
        Source::Env("SYNC_INTERVAL_SECS")
    );
}

#[test]
fn older_variable_names_still_work_and_the_new_name_wins() {
    let mut env = MINIMAL_ENV.to_vec();
    env.push(("SYNC_DB_POOL", "3"));
    assert_eq!(load(None, &env).unwrap().db_pool_size, 3);
    env.push(("OCO_DB_POOL_SIZE", "5"));
    assert_eq!(load(None, &env).unwrap().db_pool_size, 5);
}

#[test]
fn the_secret_key_comes_from_the_environment_before_a_key_file() {
    let dir = Dir::new("secret");
    let other = "ff".repeat(32);
    let key = dir.file("key", &other);
    let path = dir.file(
        "c.toml",
        &format!(
            "[database]\nurl = \"postgres://x@db/o\"\nsecret_key_file = \"{}\"\n[exchange]\nkind = \"testnet\"\n",
            key.display()
        ),
    );
    let s = load(Some(&path), &[("OCO_SECRET_KEY", KEY_HEX)]).unwrap();
    assert_eq!(
        s.sources["database.secret_key_file"],
        Source::Env("OCO_SECRET_KEY")
    );
    let s = load(Some(&path), &[]).unwrap();
    assert_eq!(
        s.sources["database.secret_key_file"],
        Source::File(path.clone())
    );
    let s = load(
        None,
        &[
            ("DATABASE_URL", "postgres://x@db/o"),
            ("OCO_EXCHANGE", "testnet"),
            ("OCO_SECRET_KEY_FILE", key.to_str().unwrap()),
        ],
    )
    .unwrap();
    assert_eq!(
        s.sources["database.secret_key_file"],
        Source::Env("OCO_SECRET_KEY_FILE")
    );
}

#[test]
fn debug_and_the_printed_settings_show_neither_the_key_nor_the_password() {
    let s = load(None, MINIMAL_ENV).unwrap();
    let debug = format!("{s:?}");
    let mut printed = Vec::new();
    ocoguard::print_settings(&mut printed, &s).unwrap();
    let printed = String::from_utf8(printed).unwrap();
    for shown in [&debug, &printed] {
        assert!(!shown.contains(KEY_HEX), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("u:***@db"), "{shown}");
    }
    assert!(
        printed.contains("sync.interval_secs         300"),
        "{printed}"
    );
    assert!(
        printed.contains("(environment variable DATABASE_URL)"),
        "{printed}"
    );
    assert!(printed.contains("(default)"), "{printed}");

    // A malformed key is refused by its length, never echoed.
    let mut env = MINIMAL_ENV.to_vec();
    env[1] = ("OCO_SECRET_KEY", "not-a-key-but-a-secret");
    let err = load(None, &env).unwrap_err();
    assert_eq!(
        err,
        "environment variable OCO_SECRET_KEY: secret key is malformed: expected 32 bytes as 64 hex digits or 44 base64 characters, got 22 characters"
    );
}

#[test]
fn the_shipped_example_parses_and_says_what_it_says() {
    let dir = Dir::new("example");
    let key = dir.file("key", KEY_HEX);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ocoguard.example.toml");
    // The example points at /etc/ocoguard/secret.key; the test's own key file
    // stands in through the variable, as a deployment may do too.
    let s = load(
        Some(&example),
        &[("OCO_SECRET_KEY_FILE", key.to_str().unwrap())],
    )
    .unwrap();
    assert_eq!(s.exchange, ExchangeKind::Testnet);
    assert_eq!(
        s.database_url,
        "postgres://ocoguard@127.0.0.1:5432/ocoguard"
    );
    assert_eq!(s.db_pool_size, 16);
    assert_eq!(s.id_namespace, "og");
    assert_eq!(s.sync_weight_budget, 3000);
    // Every option with a default appears in the example with that default,
    // so the example cannot drift from the code.
    let text = std::fs::read_to_string(&example).unwrap();
    for o in OPTIONS {
        let name = o.key.rsplit('.').next().unwrap();
        assert!(
            text.contains(&format!("{name} = ")),
            "{} missing from the example",
            o.key
        );
    }
    let by_file: Vec<_> = s
        .describe()
        .into_iter()
        .filter(|(_, _, src)| *src == Source::Default)
        .map(|(k, _, _)| k)
        .collect();
    assert_eq!(
        by_file,
        [
            "exchange.rest_url",
            "exchange.ws_url",
            "gateway.id",
            "gateway.cpu_wakeup_latency_us"
        ],
        "only these are left commented out"
    );
}

#[test]
fn every_option_is_in_the_readme_table() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    for o in OPTIONS {
        let vars: Vec<String> = o.env.iter().map(|v| format!("`{v}`")).collect();
        let row = format!("| `{}` | {} | {} |", o.key, vars.join(", "), o.default);
        assert!(readme.contains(&row), "README lacks the row starting {row}");
    }
}

fn bad_file(text: &str, env: &[(&str, &str)]) -> (String, PathBuf, Dir) {
    let dir = Dir::new("bad");
    let path = dir.file("ocoguard.toml", text);
    let err = load(Some(&path), env).unwrap_err();
    (err, path, dir)
}

#[test]
fn an_unknown_key_is_refused_with_its_line() {
    let (err, path, _dir) = bad_file(
        "[database]\nurl = \"postgres://x@db/o\"\n\n[sync]\nintervall_secs = 60\n",
        MINIMAL_ENV,
    );
    assert_eq!(
        err,
        format!(
            "config file {}: line 5, column 1: unknown field `intervall_secs`, expected one of `interval_secs`, `startup_delay_secs`, `concurrency`, `weight_budget` (in `sync`)",
            path.display()
        )
    );
    let (err, path, _dir) = bad_file("databse_url = \"x\"\n", MINIMAL_ENV);
    assert!(
        err.starts_with(&format!(
            "config file {}: line 1, column 1: ",
            path.display()
        )),
        "{err}"
    );
    assert!(err.contains("unknown field `databse_url`"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_is_refused_with_its_line() {
    let (err, path, _dir) = bad_file("[sync]\ninterval_secs = \"five\"\n", MINIMAL_ENV);
    assert_eq!(
        err,
        format!(
            "config file {}: line 2, column 17: invalid type: string \"…\", expected u64 (in `sync.interval_secs`)",
            path.display()
        )
    );
    let (err, _path, _dir) = bad_file("[exchange]\nkind = \"prod\"\n", MINIMAL_ENV);
    assert!(
        err.ends_with(
            "unknown variant `prod`, expected one of `production`, `testnet`, `sim` (in `exchange.kind`)"
        ),
        "{err}"
    );
    let (err, _path, _dir) = bad_file("[api]\nlisten = \"localhost\"\n", MINIMAL_ENV);
    assert!(err.contains("line 2, column 10"), "{err}");
    assert!(err.contains("invalid socket address syntax"), "{err}");
    let (err, _path, _dir) = bad_file("[database\nurl = 1\n", MINIMAL_ENV);
    assert!(err.contains(": line 1, column "), "{err}");
}

#[test]
fn a_bad_environment_value_is_refused_naming_the_variable() {
    let mut env = MINIMAL_ENV.to_vec();
    env.push(("SYNC_INTERVAL_SECS", "5m"));
    assert_eq!(
        load(None, &env).unwrap_err(),
        "environment variable SYNC_INTERVAL_SECS: invalid value \"5m\": invalid digit found in string"
    );
    let mut env = MINIMAL_ENV.to_vec();
    env[2] = ("OCO_EXCHANGE", "mainnet");
    assert_eq!(
        load(None, &env).unwrap_err(),
        "environment variable OCO_EXCHANGE: invalid value \"mainnet\": expected `production`, `testnet` or `sim`"
    );
    let mut env = MINIMAL_ENV.to_vec();
    env.push(("OCO_CPU_WAKEUP_LATENCY_US", "-1"));
    assert_eq!(
        load(None, &env).unwrap_err(),
        "environment variable OCO_CPU_WAKEUP_LATENCY_US: invalid value \"-1\": invalid digit found in string"
    );
}

#[test]
fn a_missing_required_setting_is_named_with_the_file() {
    let (err, path, _dir) = bad_file(
        "[database]\nurl = \"postgres://x@db/o\"\n",
        &[("OCO_SECRET_KEY", KEY_HEX)],
    );
    assert_eq!(
        err,
        format!(
            "missing required setting `exchange.kind`: set it in {} or set OCO_EXCHANGE",
            path.display()
        )
    );
    assert_eq!(
        load(None, &[("OCO_SECRET_KEY", KEY_HEX)]).unwrap_err(),
        "missing required setting `database.url`: set DATABASE_URL, or `database.url` in the file given by --config"
    );
    let (err, path, _dir) = bad_file("[database]\nurl = \"postgres://x@db/o\"\n", &[]);
    assert_eq!(
        err,
        format!(
            "missing required setting `database.secret_key_file`: set it in {} or set OCO_SECRET_KEY_FILE or OCO_SECRET_KEY",
            path.display()
        )
    );
    let mut env = MINIMAL_ENV.to_vec();
    env[2] = ("OCO_EXCHANGE", "sim");
    assert_eq!(
        load(None, &env).unwrap_err(),
        "missing required setting `exchange.rest_url`: set BINANCE_REST_URL, or `exchange.rest_url` in the file given by --config (the `sim` exchange has no preset URLs)"
    );
}

#[test]
fn unusable_values_and_inline_secrets_are_refused() {
    let (err, path, _dir) = bad_file(
        "[gateway]\nlease_ttl_secs = 10\nlease_renew_secs = 10\n",
        MINIMAL_ENV,
    );
    assert_eq!(
        err,
        format!(
            "`gateway.lease_renew_secs` in {p} (10) must be below `gateway.lease_ttl_secs` in {p} (10)",
            p = path.display()
        )
    );
    let (err, path, _dir) = bad_file("[gateway]\naccounts_per_connection = 1001\n", MINIMAL_ENV);
    assert!(
        err.starts_with(&format!(
            "`gateway.accounts_per_connection` in {}: at most 1000",
            path.display()
        )),
        "{err}"
    );
    let mut env = MINIMAL_ENV.to_vec();
    env.push(("OCO_STREAM_CONNECT_ATTEMPTS", "0"));
    assert_eq!(
        load(None, &env).unwrap_err(),
        "OCO_STREAM_CONNECT_ATTEMPTS: must be above 0"
    );
    let mut env = MINIMAL_ENV.to_vec();
    env.push(("OCO_ACCOUNTS_PER_CONNECTION", "20"));
    env.push(("OCO_STREAM_CONNECT_ATTEMPTS", "5"));
    let stream = load(None, &env).unwrap().binance_config().unwrap().stream;
    assert_eq!(
        (
            stream.subscriptions_per_connection,
            stream.connect_attempts,
            stream.connect_burst
        ),
        (20, 5, 5)
    );
    let (err, path, _dir) = bad_file("[sync]\nconcurrency = 0\n", MINIMAL_ENV);
    assert_eq!(
        err,
        format!("`sync.concurrency` in {}: must be above 0", path.display())
    );
    let mut env = MINIMAL_ENV.to_vec();
    env.push(("OCO_ID_NAMESPACE", "way-too-long"));
    assert!(
        load(None, &env)
            .unwrap_err()
            .starts_with("OCO_ID_NAMESPACE: "),
    );
    let (err, path, _dir) = bad_file(
        &format!("[database]\nsecret_key = \"{KEY_HEX}\"\n"),
        MINIMAL_ENV,
    );
    assert_eq!(
        err,
        format!(
            "config file {}: `database.secret_key` is not accepted in a file; set `database.secret_key_file` to a file holding the key, or OCO_SECRET_KEY",
            path.display()
        )
    );
    assert!(!err.contains(KEY_HEX));
    let dir = Dir::new("nokey");
    let path = dir.file(
        "c.toml",
        "[database]\nsecret_key_file = \"/nonexistent/ocoguard.key\"\n",
    );
    let err = load(
        Some(&path),
        &[
            ("DATABASE_URL", "postgres://x@db/o"),
            ("OCO_EXCHANGE", "testnet"),
        ],
    )
    .unwrap_err();
    assert_eq!(
        err,
        format!(
            "`database.secret_key_file` in {}: cannot read secret key file /nonexistent/ocoguard.key: No such file or directory (os error 2)",
            path.display()
        )
    );
    let missing = dir.0.join("absent.toml");
    assert_eq!(
        load(Some(&missing), MINIMAL_ENV).unwrap_err(),
        format!(
            "cannot read config file {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
}

#[test]
fn migrate_needs_only_the_database_url() {
    let dir = Dir::new("migrate");
    let path = dir.file("c.toml", "[database]\nurl = \"postgres://m@db/o\"\n");
    assert_eq!(
        database_url(Some(&path), &env_of(&[])).unwrap(),
        "postgres://m@db/o"
    );
    assert_eq!(
        database_url(
            Some(&path),
            &env_of(&[("DATABASE_URL", "postgres://e@db/o")])
        )
        .unwrap(),
        "postgres://e@db/o"
    );
    assert_eq!(
        database_url(None, &env_of(&[])).unwrap_err().to_string(),
        "missing required setting `database.url`: set DATABASE_URL, or `database.url` in the file given by --config"
    );
}

#[test]
fn the_binary_refuses_a_bad_file_before_touching_anything() {
    let dir = Dir::new("binary");
    let path = dir.file("ocoguard.toml", "[sync]\nintervall_secs = 60\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ocoguard"))
        .args(["config", "--config"])
        .arg(&path)
        .env_remove("OCOGUARD_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!(
            "ocoguard: config file {}: line 2, column 1: unknown field `intervall_secs`",
            path.display()
        )),
        "{stderr}"
    );

    let key = dir.file("key", KEY_HEX);
    let good = dir.file(
        "good.toml",
        &format!(
            "[database]\nurl = \"postgres://u:pw@db/o\"\nsecret_key_file = \"{}\"\n[exchange]\nkind = \"testnet\"\n",
            key.display()
        ),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ocoguard"))
        .args(["config", "--config"])
        .arg(&good)
        .env("SYNC_INTERVAL_SECS", "42")
        .env_remove("DATABASE_URL")
        .env_remove("OCO_SECRET_KEY")
        .env_remove("OCO_EXCHANGE")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout} {:?}", out.stderr);
    assert!(stdout.contains("postgres://u:***@db/o"), "{stdout}");
    assert!(
        stdout.contains("(environment variable SYNC_INTERVAL_SECS)"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(KEY_HEX) && !stdout.contains(":pw@"),
        "{stdout}"
    );
}

#[test]
fn a_bad_file_is_placed_by_line_and_column_without_its_source_text() {
    // Each file puts a secret where the parser or the field list refuses it;
    // the error names the place and never shows the value.
    let cases: &[(&str, &str)] = &[
        (
            "[database]\nsecret_key = 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
            "line 2, column 14: unexpected leading zero",
        ),
        (
            "secret_key = \"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"\n",
            "line 1, column 1: unknown field `secret_key`",
        ),
        (
            "[database]\nulr = \"postgres://u:hunter2@db/o\"\n",
            "line 2, column 1: unknown field `ulr`",
        ),
        (
            "[database]\npool_size = \"postgres://u:hunter2@db/o\"\n",
            "line 2, column 13: invalid type: string \"…\", expected usize",
        ),
    ];
    for (text, place) in cases {
        let (err, path, _dir) = bad_file(text, MINIMAL_ENV);
        assert!(
            err.starts_with(&format!("config file {}: {place}", path.display())),
            "{err}"
        );
        assert!(!err.contains(KEY_HEX), "{err}");
        assert!(!err.contains("0011"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}

#[test]
fn a_password_in_the_query_is_hidden_too() {
    // libpq takes `?password=` as readily as `user:password@`.
    let mut env = MINIMAL_ENV.to_vec();
    env[0] = (
        "DATABASE_URL",
        "postgres://u@db/oco?sslmode=require&password=hunter2",
    );
    let s = load(None, &env).unwrap();
    let debug = format!("{s:?}");
    let mut printed = Vec::new();
    ocoguard::print_settings(&mut printed, &s).unwrap();
    let printed = String::from_utf8(printed).unwrap();
    for shown in [&debug, &printed] {
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("postgres://u@db/oco?sslmode=require&password=***"),
            "{shown}"
        );
    }
    assert_eq!(
        ocoguard::config::redact_url("postgres://u:pw@db/o?PASSWORD=x&password=y"),
        "postgres://u:***@db/o?PASSWORD=***&password=***"
    );
    assert_eq!(
        ocoguard::config::redact_url("postgres://u@db/o?sslmode=disable"),
        "postgres://u@db/o?sslmode=disable"
    );
}
