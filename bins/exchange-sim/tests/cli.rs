//! The binary's command-line contract: `--listen`, `--account`, `--admin`, first stdout line.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: SocketAddr, target: &str, method: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

#[test]
fn binary_prints_address_and_serves_rest_and_admin() {
    let child = Command::new(env!("CARGO_BIN_EXE_exchange-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--account",
            "k1:s1:USDT=1000,BTC=0.5",
            "--account",
            "k2:s2:USDT=5",
            "--admin",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut run = Running(child);
    let mut line = String::new();
    BufReader::new(run.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line.trim().parse().unwrap();
    assert_ne!(addr.port(), 0);
    assert_eq!(
        get(addr, "/api/v3/ping", "GET", ""),
        (200, "{}".to_string())
    );
    let (status, body) = get(addr, "/admin/accounts/k1/balances", "GET", "");
    assert_eq!(status, 200);
    assert!(
        body.contains(r#"{"asset":"BTC","free":"0.5","locked":"0"}"#),
        "{body}"
    );
    let (status, _) = get(
        addr,
        "/admin/price",
        "POST",
        r#"{"symbol":"BTCUSDT","price":"12345.67"}"#,
    );
    assert_eq!(status, 200);
    let (_, body) = get(addr, "/api/v3/ticker/price?symbol=BTCUSDT", "GET", "");
    assert_eq!(body, r#"{"symbol":"BTCUSDT","price":"12345.67000000"}"#);
    // Fault endpoints need --faults.
    assert_eq!(get(addr, "/admin/faults/clear", "POST", "").0, 404);
}

#[test]
fn admin_api_is_off_without_the_flag() {
    let child = Command::new(env!("CARGO_BIN_EXE_exchange-sim"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut run = Running(child);
    let mut line = String::new();
    BufReader::new(run.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line.trim().parse().unwrap();
    assert_eq!(get(addr, "/admin/prices", "GET", "").0, 404);
    assert_eq!(get(addr, "/api/v3/time", "GET", "").0, 200);
}
