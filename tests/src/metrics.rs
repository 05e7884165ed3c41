//! The layers' Prometheus metrics, read from outside: where a process serves
//! them (it logs the address it bound, the harness gives it port 0) and the
//! samples of one family in the text it answers.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// The `/metrics` URL a process announced in its log since its last start
/// (`text` is the whole log, starts marked by `==== start`): the `metrics`
/// field of `ws-gateway started` or `sync started`, or the `addr` of the
/// API's `entry API listening, metrics on /metrics`. `None` before the line
/// is written.
pub fn metrics_url_in_log(text: &str) -> Option<String> {
    let since_start = text.rsplit("==== start").next().unwrap_or(text);
    since_start.lines().rev().find_map(|line| {
        let json: Value = serde_json::from_str(line).ok()?;
        let fields = &json["fields"];
        let addr = match fields["metrics"].as_str() {
            Some(addr) => addr,
            None if fields["message"]
                .as_str()
                .is_some_and(|m| m.contains("metrics on /metrics")) =>
            {
                fields["addr"].as_str()?
            }
            None => return None,
        };
        Some(format!("http://{addr}/metrics"))
    })
}

/// One sample of a family: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Label name → value.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, `""` when absent.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// The samples named exactly `name` (`oco_protect_calls_total`) in an
/// exposition text. Label values must not hold `,` or `"` (ours do not).
pub fn samples(text: &str, name: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.trim().parse().ok()?;
            let (metric, labels) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let labels = labels
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect::<Option<BTreeMap<_, _>>>()?;
            Some(Sample { labels, value })
        })
        .collect()
}

/// `GET url`, the text of a 200.
///
/// # Errors
/// Transport errors and any other status.
pub async fn scrape(url: &str) -> anyhow::Result<String> {
    let http = crate::http_client(Duration::from_secs(5));
    let reply = http
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = reply.status();
    let text = reply.text().await.with_context(|| format!("GET {url}"))?;
    if !status.is_success() {
        bail!("GET {url}: {status} {text}");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_address_comes_from_the_last_start_only() {
        let log = concat!(
            "==== start 1 of ws-gateway-1\n",
            r#"{"level":"INFO","fields":{"message":"ws-gateway started","metrics":"127.0.0.1:1111"}}"#,
            "\n==== start 2 of ws-gateway-1\n",
            "not json\n",
        );
        assert_eq!(metrics_url_in_log(log), None, "restarted, not yet bound");
        let log = format!(
            "{log}{}\n",
            r#"{"level":"INFO","fields":{"message":"ws-gateway started","metrics":"127.0.0.1:2222"}}"#
        );
        assert_eq!(
            metrics_url_in_log(&log).as_deref(),
            Some("http://127.0.0.1:2222/metrics")
        );
        let api = r#"{"fields":{"message":"entry API listening, metrics on /metrics","addr":"127.0.0.1:3333"}}"#;
        assert_eq!(
            metrics_url_in_log(api).as_deref(),
            Some("http://127.0.0.1:3333/metrics")
        );
        let other = r#"{"fields":{"message":"listening","addr":"127.0.0.1:4444"}}"#;
        assert_eq!(metrics_url_in_log(other), None);
    }

    #[test]
    fn samples_are_read_by_exact_name_with_their_labels() {
        let text = "# TYPE oco_protect_calls counter\n\
                    oco_protect_calls_total{source=\"direct\",outcome=\"placed\"} 6\n\
                    oco_protect_calls_total{source=\"websocket\",outcome=\"in_flight\"} 2\n\
                    oco_protect_calls_created{source=\"direct\",outcome=\"placed\"} 1.7e9\n\
                    oco_coverage_ratio 1.0\n\
                    # EOF\n";
        let calls = samples(text, "oco_protect_calls_total");
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].label("source"), "direct");
        assert_eq!(calls[0].label("outcome"), "placed");
        assert_eq!(calls[0].value, 6.0);
        assert_eq!(calls[1].label("source"), "websocket");
        assert_eq!(samples(text, "oco_coverage_ratio")[0].value, 1.0);
        assert!(samples(text, "oco_protect_calls").is_empty());
    }
}
