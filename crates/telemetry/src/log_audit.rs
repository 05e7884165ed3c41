//! Checks on captured JSON log lines, for the tests of every binary: which
//! lines are about an order and what they name, and whether a line holds a
//! secret in any of the forms a leak takes (a digest, a signature parameter).
//! Behind the `test-support` feature: production code never needs it.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// A log writer that keeps every byte, for a test to read back.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Installs the process's subscriber writing JSON at `debug` (every line
    /// a secret could leak through) into a new buffer, and returns it.
    ///
    /// # Panics
    /// When the process has a subscriber already.
    pub fn json_debug_logs() -> Captured {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing::subscriber::set_global_default(crate::log_subscriber(
            crate::LogFormat::Json,
            "debug",
            move || writer.clone(),
        ))
        .expect("a test binary of its own: no subscriber yet");
        captured
    }

    /// Every line, parsed.
    ///
    /// # Panics
    /// On a line that is not JSON.
    pub fn lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

/// The lines about an order, after checking that each names `account`,
/// `entry` and a client id (its fields or its spans).
///
/// # Panics
/// On a line about an order that misses one, or names another account or entry.
pub fn order_lines<'a>(lines: &'a [Value], account: &str, entry: &str) -> Vec<&'a Value> {
    let about: Vec<&Value> = lines.iter().filter(|l| is_about_an_order(l)).collect();
    for line in &about {
        for (name, want) in [
            ("account", Some(account)),
            ("entry", Some(entry)),
            // The entry's, or a leg's own.
            ("client_id", None),
        ] {
            let found = values_of(line, name);
            assert!(
                !found.is_empty(),
                "a line about an order without {name}: {line}"
            );
            if let Some(want) = want {
                assert!(
                    found.iter().all(|v| v == want),
                    "{name} is not {want}: {line}"
                );
            }
        }
    }
    about
}

/// Checks that `text` holds none of `secrets` (each named for the message)
/// and no line of it looks like a leak ([`leak_in`]).
///
/// # Panics
/// On the first secret or leak found.
pub fn assert_no_secrets(text: &str, secrets: &[(&str, &str)]) {
    for (what, secret) in secrets {
        assert!(!text.contains(secret), "{what} is logged: {text}");
    }
    for line in text.lines() {
        if let Some(leak) = leak_in(line) {
            panic!("{leak} is logged: {line}");
        }
    }
}

/// Why `line` looks like a leak, if it does: a run of 64 hex digits (an
/// HMAC-SHA256 in any quoting), a base64 32-byte digest, or `signature` named
/// as a parameter.
pub fn leak_in(line: &str) -> Option<&'static str> {
    if longest_run(line, |c| c.is_ascii_hexdigit()) >= 64 {
        Some("a hex digest (a signature or a key)")
    } else if has_base64_digest(line) {
        Some("a base64 digest")
    } else if names_a_signature(line) {
        Some("a request signature")
    } else {
        None
    }
}

/// Whether a log line is about an order: it names a client id, or its message
/// speaks of an entry, a leg, an order or its protection.
pub fn is_about_an_order(line: &Value) -> bool {
    const WORDS: &[&str] = &[
        "entry",
        "entries",
        "leg",
        "legs",
        "order",
        "orders",
        "oco",
        "protect",
        "protected",
        "protection",
        "exit",
        "cancel",
        "fill",
        "filled",
    ];
    let message = line["fields"]["message"].as_str().unwrap_or("");
    // "The entry API" is the process's name, not an order.
    let message = message.replace("entry API", "");
    !values_of(line, "client_id").is_empty()
        || message
            .to_ascii_lowercase()
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| WORDS.contains(&w))
}

/// Every value of `name` in the line's fields and its spans, as text.
pub fn values_of(line: &Value, name: &str) -> Vec<String> {
    let spans = line["spans"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    std::iter::once(&line["fields"])
        .chain(spans)
        .filter_map(|scope| match &scope[name] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        })
        .collect()
}

/// Whether the line was logged inside a span named `name`.
pub fn in_span(line: &Value, name: &str) -> bool {
    line["spans"]
        .as_array()
        .is_some_and(|spans| spans.iter().any(|s| s["name"] == name))
}

/// The longest run of characters that `keep` accepts.
pub fn longest_run(text: &str, keep: impl Fn(char) -> bool) -> usize {
    text.split(|c| !keep(c)).map(str::len).max().unwrap_or(0)
}

/// 32 bytes in base64: 43 characters of the alphabet and one `=`.
pub fn has_base64_digest(line: &str) -> bool {
    let b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/';
    line.split('=').any(|before| {
        let run = before.chars().rev().take_while(|c| b64(*c)).count();
        run >= 43
    })
}

/// `signature` as a parameter name, whatever its value: `signature=`,
/// `signature: `, or quoted as a JSON key or a Debug string (`"signature":`,
/// `\"signature\": `, `("signature", …)`). Prose ("Signature for this request
/// is not valid.") and the method `userDataStream.subscribe.signature` pass.
pub fn names_a_signature(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    lower.match_indices("signature").any(|(at, word)| {
        let quoted = lower[..at].ends_with('"');
        let valued = lower[at + word.len()..]
            .trim_start_matches(['"', '\\', ' '])
            .starts_with(['=', ':']);
        quoted || valued
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_BASE64: &str = "fD6RpdILSPbhVzrJsI0mT1oePHudDyRorOE1eb3wJGg=";

    #[test]
    fn the_secret_checks_catch_every_form() {
        let hmac = "0f".repeat(32);
        for leak in [
            format!("GET /api/v3/order?symbol=BTCUSDT&signature={hmac}"),
            format!(r#"{{"fields":{{"signature":"{hmac}"}}}}"#),
            r#"{"fields":{"params":"{\"signature\": \"x\"}"}}"#.to_owned(),
            "Params { signature: \"x\" }".to_owned(),
            format!(r#"{{"fields":{{"params":"[(\"signature\", \"{hmac}\")]"}}}}"#),
        ] {
            assert!(names_a_signature(&leak), "{leak}");
        }
        for harmless in [
            "Signature for this request is not valid.",
            r#"{"fields":{"method":"userDataStream.subscribe.signature"}}"#,
        ] {
            assert!(!names_a_signature(harmless), "{harmless}");
        }
        assert!(longest_run(&format!("a {hmac} b"), |c| c.is_ascii_hexdigit()) >= 64);
        assert!(longest_run(&format!("a {} b", &hmac[1..]), |c| c.is_ascii_hexdigit()) < 64);
        assert!(has_base64_digest(&format!("key {KEY_BASE64}")));
        assert!(!has_base64_digest("message=entry answered"));
    }
}
