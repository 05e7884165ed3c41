//! Argument parsing of the `exchange-sim` binary, kept in a library so tests can reuse it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use exchange_sim::{AccountSpec, Commission, CommissionAsset, RateLimits, SimConfig};
use rust_decimal::Decimal;

/// Command line of `exchange-sim` (a stable contract: other tools drive the binary by it).
#[derive(Debug, Parser)]
#[command(
    name = "exchange-sim",
    about = "Binance-Spot-compatible exchange simulator"
)]
pub struct Args {
    /// Address to listen on; port 0 picks a free one (printed on the first stdout line).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Account as `API_KEY:SECRET:ASSET=AMOUNT,ASSET=AMOUNT` (repeatable).
    #[arg(long = "account")]
    pub accounts: Vec<String>,
    /// Commission as `RATE` or `RATE:ASSET` where ASSET is BASE, QUOTE or a coin (default 0.001:BASE).
    #[arg(long)]
    pub commission: Option<String>,
    /// Serve the admin API under /admin/ (prices, accounts, inspection).
    #[arg(long)]
    pub admin: bool,
    /// Serve the fault-injection endpoints under /admin/faults/ (implies --admin).
    #[arg(long)]
    pub faults: bool,
    /// Enforce Binance's rate limits (6000 weight/min per IP, 50 orders/10 s per account).
    #[arg(long)]
    pub rate_limits: bool,
    /// WebSocket ping interval in seconds.
    #[arg(long, default_value_t = 20)]
    pub ping_interval_secs: u64,
    /// Drop a WebSocket connection when a ping is unanswered for this many seconds.
    #[arg(long, default_value_t = 60)]
    pub pong_timeout_secs: u64,
    /// Close WebSocket connections after this many seconds.
    #[arg(long, default_value_t = 86_400)]
    pub max_connection_age_secs: u64,
}

/// Parses `API_KEY:SECRET:ASSET=AMOUNT,…`.
///
/// # Errors
/// A message naming the malformed part.
pub fn parse_account(s: &str, commission: &Commission) -> anyhow::Result<AccountSpec> {
    let mut it = s.splitn(3, ':');
    let key = it
        .next()
        .filter(|k| !k.is_empty())
        .context("account needs API_KEY")?;
    let secret = it
        .next()
        .filter(|k| !k.is_empty())
        .with_context(|| format!("account {key} needs SECRET"))?;
    let mut balances = Vec::new();
    if let Some(list) = it.next() {
        for part in list.split(',').filter(|p| !p.is_empty()) {
            let (asset, amount) = part
                .split_once('=')
                .with_context(|| format!("balance {part:?} of {key} is not ASSET=AMOUNT"))?;
            let amount: Decimal = amount
                .parse()
                .with_context(|| format!("amount {amount:?} of {asset} is not a decimal"))?;
            balances.push((asset.to_string(), amount));
        }
    }
    Ok(AccountSpec::new(key, secret, balances).with_commission(commission.clone()))
}

/// Parses `RATE` or `RATE:ASSET`.
///
/// # Errors
/// When the rate is not a decimal.
pub fn parse_commission(s: &str) -> anyhow::Result<Commission> {
    let (rate, asset) = s.split_once(':').unwrap_or((s, "BASE"));
    let rate: Decimal = rate
        .parse()
        .with_context(|| format!("commission rate {rate:?} is not a decimal"))?;
    let asset = match asset.to_ascii_uppercase().as_str() {
        "BASE" => CommissionAsset::Base,
        "QUOTE" => CommissionAsset::Quote,
        other => CommissionAsset::Other(other.to_string()),
    };
    Ok(Commission { rate, asset })
}

/// Builds the simulator configuration from the arguments.
///
/// # Errors
/// On a malformed `--account` or `--commission`.
pub fn config_from_args(args: &Args) -> anyhow::Result<SimConfig> {
    let commission = match &args.commission {
        Some(c) => parse_commission(c)?,
        None => Commission::default(),
    };
    if args.ping_interval_secs == 0 {
        bail!("--ping-interval-secs must be above 0");
    }
    let mut cfg = SimConfig::new(args.listen)
        .with_admin(args.admin || args.faults)
        .with_faults(args.faults)
        .with_ping_interval(Duration::from_secs(args.ping_interval_secs))
        .with_pong_timeout(Duration::from_secs(args.pong_timeout_secs))
        .with_max_connection_age(Duration::from_secs(args.max_connection_age_secs));
    if args.rate_limits {
        cfg = cfg.with_rate_limits(RateLimits::binance());
    }
    for a in &args.accounts {
        cfg = cfg.with_account(parse_account(a, &commission)?);
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_account_flag() {
        let a = parse_account("k1:s1:USDT=10000,BTC=0.5", &Commission::default()).unwrap();
        assert_eq!(a.api_key, "k1");
        assert_eq!(a.secret, "s1");
        assert_eq!(
            a.balances,
            vec![
                ("USDT".into(), Decimal::from(10_000)),
                ("BTC".into(), Decimal::new(5, 1))
            ]
        );
        assert!(parse_account("k1", &Commission::default()).is_err());
        assert!(parse_account("k1:s:USDT=x", &Commission::default()).is_err());
    }

    #[test]
    fn parses_commission() {
        let c = parse_commission("0.00075:BNB").unwrap();
        assert_eq!(c.asset, CommissionAsset::Other("BNB".into()));
        assert_eq!(c.rate, Decimal::new(75, 5));
    }
}
