//! Log format choice: `auto` means JSON for a service (stderr not a
//! terminal) and human-readable lines in a terminal.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::io::IsTerminal as _;

use telemetry::LogFormat;

#[test]
fn formats_parse_in_any_case_and_unknown_ones_name_the_choices() {
    assert_eq!(LogFormat::parse(" AUTO ").unwrap(), LogFormat::Auto);
    assert_eq!(LogFormat::parse("json").unwrap(), LogFormat::Json);
    assert_eq!(LogFormat::parse("Human").unwrap(), LogFormat::Human);
    let err = LogFormat::parse("xml").unwrap_err();
    assert!(
        err.contains("\"xml\"") && err.contains("auto, json or human"),
        "{err}"
    );
}

#[test]
fn auto_is_json_unless_stderr_is_a_terminal() {
    let expected = if std::io::stderr().is_terminal() {
        LogFormat::Human
    } else {
        LogFormat::Json
    };
    assert_eq!(LogFormat::Auto.for_stderr(), expected);
    assert_eq!(LogFormat::Json.for_stderr(), LogFormat::Json);
    assert_eq!(LogFormat::Human.for_stderr(), LogFormat::Human);
}
