//! End-to-end bench of exchange-sim on 127.0.0.1: signed REST requests per second (with an
//! unsigned `ping` baseline from the same run) and the server's RSS with 10,000 open
//! user-data subscriptions. The server runs in a child process (this binary with `--serve`)
//! so its memory is measured alone.
//!
//! `cargo run --release -p exchange-sim --example bench -- [SECS] [CONNECTIONS]`
//! (defaults 5 and 10000; needs `ulimit -n` above the connection count).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use exchange_sim::{AccountSpec, Sim, SimConfig, hmac_sha256_hex};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "bench-key";
const SECRET: &str = "bench-secret";

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn serve() -> Result<(), BoxErr> {
    let cfg = SimConfig::new("127.0.0.1:0".parse()?).with_account(AccountSpec::new(
        KEY,
        SECRET,
        vec![
            ("USDT".into(), "100000000".parse()?),
            ("BTC".into(), "1000".parse()?),
        ],
    ));
    let sim = Sim::start(cfg).await?;
    println!("{}", sim.addr());
    std::io::stdout().flush()?;
    // Run until the parent closes stdin.
    tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    })
    .await?;
    sim.shutdown().await;
    Ok(())
}

/// A keep-alive HTTP/1.1 connection; returns the status of each answer.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn new(addr: SocketAddr) -> Result<Self, BoxErr> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            s,
            buf: Vec::with_capacity(8192),
        })
    }

    async fn call(&mut self, req: &[u8]) -> Result<u16, BoxErr> {
        self.s.write_all(req).await?;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])?.to_string();
                let status: u16 = head.split(' ').nth(1).ok_or("no status")?.parse()?;
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    self.fill().await?;
                }
                self.buf.drain(..end + 4 + len);
                return Ok(status);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), BoxErr> {
        let mut tmp = [0u8; 8192];
        let n = self.s.read(&mut tmp).await?;
        if n == 0 {
            return Err("closed".into());
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn signed_get(addr: SocketAddr, path: &str, params: &str) -> Vec<u8> {
    let q = format!("{params}&recvWindow=60000&timestamp={}", now_ms());
    let sig = hmac_sha256_hex(SECRET, &q);
    format!(
        "GET {path}?{q}&signature={sig} HTTP/1.1\r\nHost: {addr}\r\nX-MBX-APIKEY: {KEY}\r\n\r\n"
    )
    .into_bytes()
}

fn signed_body(addr: SocketAddr, method: &str, path: &str, params: &str) -> Vec<u8> {
    let b = format!("{params}&recvWindow=60000&timestamp={}", now_ms());
    let sig = hmac_sha256_hex(SECRET, &b);
    let body = format!("{b}&signature={sig}");
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nX-MBX-APIKEY: {KEY}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Runs `conns` connections for `secs`; `make(i)` builds the i-th request of a connection.
async fn load<F>(addr: SocketAddr, conns: usize, secs: u64, make: F) -> Result<(f64, u64), BoxErr>
where
    F: Fn(SocketAddr, u64, u64) -> Vec<Vec<u8>> + Send + Sync + 'static,
{
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let make = Arc::new(make);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (ok, bad, make) = (ok.clone(), bad.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr).await?;
            let mut i = 0u64;
            while Instant::now() < deadline {
                for req in make(addr, c as u64, i) {
                    match conn.call(&req).await? {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => bad.fetch_add(1, Ordering::Relaxed),
                    };
                }
                i += 1;
            }
            Ok::<(), BoxErr>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let n = ok.load(Ordering::Relaxed);
    Ok((
        n as f64 / start.elapsed().as_secs_f64(),
        bad.load(Ordering::Relaxed),
    ))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn bench(secs: u64, n_ws: usize) -> Result<(), BoxErr> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let addr: SocketAddr = line.trim().parse()?;
    println!(
        "server pid {pid} on {addr}; machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("server RSS at start: {} MiB", rss_kib(pid) / 1024);

    let conns = 32;
    let (ping, _) = load(addr, conns, secs, |a, _, _| {
        vec![format!("GET /api/v3/ping HTTP/1.1\r\nHost: {a}\r\n\r\n").into_bytes()]
    })
    .await?;
    println!("baseline  GET /api/v3/ping (unsigned):           {ping:>9.0} req/s");
    let (acct, bad1) = load(addr, conns, secs, |a, _, _| {
        vec![signed_get(a, "/api/v3/openOrders", "symbol=BTCUSDT")]
    })
    .await?;
    println!(
        "signed    GET /api/v3/openOrders:                {acct:>9.0} req/s  ({:.2} of baseline, {bad1} non-200)",
        acct / ping
    );
    let (place, bad2) = load(addr, conns, secs, |a, c, i| {
        let cid = format!("b{c}x{i}");
        vec![
            signed_body(a, "POST", "/api/v3/order", &format!("symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.001&price=30000&newOrderRespType=ACK&newClientOrderId={cid}")),
            signed_body(a, "DELETE", "/api/v3/order", &format!("symbol=BTCUSDT&origClientOrderId={cid}")),
        ]
    })
    .await?;
    println!(
        "signed    POST+DELETE /api/v3/order (each):      {place:>9.0} req/s  ({:.2} of baseline, {bad2} non-200)",
        place / ping
    );
    println!("server RSS after REST load: {} MiB", rss_kib(pid) / 1024);

    let rss_before = rss_kib(pid);
    let started = Instant::now();
    let url = format!("ws://{addr}/ws-api/v3");
    let sem = Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = Vec::new();
    for _ in 0..n_ws {
        let (url, sem) = (url.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await?;
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
            let ts = now_ms();
            let sig = hmac_sha256_hex(SECRET, &format!("apiKey={KEY}&timestamp={ts}"));
            let req = format!(r#"{{"id":1,"method":"userDataStream.subscribe.signature","params":{{"apiKey":"{KEY}","timestamp":{ts},"signature":"{sig}"}}}}"#);
            ws.send(Message::Text(req.into())).await?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.as_str().contains("\"status\":200") => break,
                    Some(Ok(Message::Text(t))) => return Err::<_, BoxErr>(format!("subscribe failed: {t}").into()),
                    Some(Ok(_)) => continue,
                    _ => return Err("closed".into()),
                }
            }
            drop(permit);
            Ok(ws)
        }));
    }
    let mut open = Vec::with_capacity(n_ws);
    for t in tasks {
        open.push(t.await??);
    }
    let rss_after = rss_kib(pid);
    println!(
        "{} user-data subscriptions open in {:.1} s; server RSS {} MiB (+{} KiB, {:.1} KiB per connection)",
        open.len(),
        started.elapsed().as_secs_f64(),
        rss_after / 1024,
        rss_after.saturating_sub(rss_before),
        rss_after.saturating_sub(rss_before) as f64 / open.len().max(1) as f64
    );
    // One fill fans out to every subscription.
    let mut conn = Conn::new(addr).await?;
    let t0 = Instant::now();
    conn.call(&signed_body(
        addr,
        "POST",
        "/api/v3/order",
        "symbol=BTCUSDT&side=BUY&type=MARKET&quantity=0.001",
    ))
    .await?;
    let mut got = 0usize;
    for ws in open.iter_mut() {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t))))
                    if t.as_str().contains("outboundAccountPosition") =>
                {
                    got += 1;
                    break;
                }
                Ok(Some(Ok(_))) => continue,
                _ => break,
            }
        }
    }
    println!(
        "one MARKET fill reached {got}/{} subscriptions in {:.0} ms",
        open.len(),
        t0.elapsed().as_secs_f64() * 1000.0
    );
    drop(open);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"\n");
    }
    let _ = child.wait();
    Ok(())
}

fn main() -> Result<(), BoxErr> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.get(1).map(String::as_str) == Some("--serve") {
        return rt.block_on(serve());
    }
    let secs = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let n_ws = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    rt.block_on(bench(secs, n_ws))
}
