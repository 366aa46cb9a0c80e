//! POS driver benchmarks (plain `main`, `cargo bench -p edge-drivers --bench pos`), each beside a
//! named baseline so that ratios hold on a noisy machine:
//!
//! 1. Throughput of the ESC/POS path on the Complete Journey fixture: tokenizer alone, and
//!    tokenizer + segmenter + template parser (MB/s, receipts/s), against splitting the same bytes
//!    into lines and decoding them (the least any text extraction does).
//! 2. Serial byte to committed record: a receipt written into a socat PTY until its transaction is
//!    durable in a real SQLite log (FULL sync), against the PTY round trip alone and a bare log
//!    append of the same records.
//! 3. Proxy: a receipt written by the POS over TCP until its last byte reaches the printer (which
//!    waits for the commit), against a plain TCP round trip.
//!
//! Prints a Markdown table to paste into `docs/BENCHMARKS.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use edge_core::component::ComponentContext;
use edge_core::log::{AppendRequest, Log};
use edge_core::{Event, Shutdown, Status};
use edge_drivers::escpos::{CodePage, EndReason, Segmenter, SegmenterConfig, Tokenizer};
use edge_drivers::printer::{
    EscposTapConfig, PrinterProxyConfig, PrinterUpstream, ReceiptOptions, build_proxy, build_tap,
};
use edge_drivers::receipt::{TemplateConfig, parse};
use edge_drivers::serial::SerialConfig;
use hdrhistogram::Histogram;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn fixture() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/cj/receipts.escpos"))
        .expect("fixture")
}

fn throughput() {
    let one = fixture();
    let reps = 200;
    let data: Vec<u8> = one.iter().copied().cycle().take(one.len() * reps).collect();
    let mb = data.len() as f64 / 1e6;
    let best = |f: &mut dyn FnMut() -> usize| {
        let mut best = f64::MAX;
        let mut out = 0;
        for _ in 0..5 {
            let t = Instant::now();
            out = f();
            best = best.min(t.elapsed().as_secs_f64());
        }
        (best, out)
    };
    let (t_base, lines) = best(&mut || {
        data.split(|&b| b == b'\n')
            .map(|l| String::from_utf8_lossy(l).len())
            .filter(|&n| n > 0)
            .count()
    });
    let (t_tok, toks) = best(&mut || {
        let mut t = Tokenizer::new(CodePage::DEFAULT);
        let mut n = 0;
        for c in data.chunks(4096) {
            t.push(c, |_, _| n += 1);
        }
        n
    });
    let (t_seg, segs) = best(&mut || {
        let mut s = Segmenter::new(SegmenterConfig::default());
        let mut n = 0;
        for c in data.chunks(4096) {
            n += s.push(c).len();
        }
        n
    });
    let template = TemplateConfig::default().compile().unwrap();
    let (t_full, receipts) = best(&mut || {
        let mut s = Segmenter::new(SegmenterConfig::default());
        let mut n = 0;
        for c in data.chunks(4096) {
            for r in s.push(c) {
                if parse(&r, &template).is_ok() {
                    n += 1;
                }
            }
        }
        n + s.idle(EndReason::StreamEnd).len()
    });
    assert_eq!(receipts, 40 * reps);
    println!(
        "### Throughput ({mb:.1} MB: the 40-receipt Complete Journey fixture x {reps}, 4 KiB chunks, best of 5)\n"
    );
    println!("| path | MB/s | receipts/s | vs baseline |");
    println!("|---|---|---|---|");
    println!(
        "| baseline: split lines + UTF-8 decode ({lines} lines) | {:.0} | - | 1.00x |",
        mb / t_base
    );
    println!(
        "| ESC/POS tokenizer ({toks} tokens) | {:.0} | {:.0} | {:.2}x |",
        mb / t_tok,
        receipts as f64 / t_tok,
        t_base / t_tok
    );
    println!(
        "| tokenizer + segmenter (lines, codes, raw kept) | {:.0} | {:.0} | {:.2}x |",
        mb / t_seg,
        segs as f64 / t_seg,
        t_base / t_seg
    );
    println!(
        "| tokenizer + segmenter + `generic` template parse | {:.0} | {:.0} | {:.2}x |",
        mb / t_full,
        receipts as f64 / t_full,
        t_base / t_full
    );
    println!();
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

fn row(name: &str, h: &Histogram<u64>) {
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} |",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

struct Pty {
    child: std::process::Child,
}
impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
fn pty(a: &Path, b: &Path) -> Pty {
    let child = std::process::Command::new("socat")
        .args(["-d", "-d"])
        .arg(format!("pty,raw,echo=0,link={}", a.display()))
        .arg(format!("pty,raw,echo=0,link={}", b.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("socat");
    let t = Instant::now();
    while !(a.exists() && b.exists()) {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    Pty { child }
}

fn open(p: &Path) -> tokio_serial::SerialStream {
    tokio_serial::SerialStream::open(&tokio_serial::new(p.to_string_lossy(), 115_200)).unwrap()
}

const SALE: &[u8] = b"\x1b@MILK 1GAL                   3.89\nBREAD                       2.49\nSUBTOTAL                    6.38\nTAX                         0.00\nTOTAL                       6.38\nVISA                        6.38\n\x1dV\x00";

async fn latency(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        edge_sync::log::SqliteLog::open(dir.path(), edge_sync::log::LogConfig::default()).unwrap(),
    );
    let shutdown = Shutdown::new();
    let status = Status::new();
    let ctx = |name: &str| {
        ComponentContext::for_test(log.clone(), name)
            .with_store("bench")
            .with_shutdown(&shutdown)
            .with_status(&status, "bench")
            .with_data_dir(dir.path())
    };
    // Baseline 1: the log alone, the same two records per receipt.
    let mut h_log = hist();
    for i in 0..n {
        let t = Instant::now();
        log.append(AppendRequest::events(vec![
            Event::new("bench.a", format!("{{\"i\":{i}}}")),
            Event::new("bench.b", format!("{{\"i\":{i}}}")),
        ]))
        .await
        .unwrap();
        h_log.record(t.elapsed().as_micros() as u64).unwrap();
    }
    // Baseline 2: PTY round trip (write on one end, read on the other).
    // (socat exits when an end is closed, so the baseline gets its own pair.)
    let (c, d) = (dir.path().join("c"), dir.path().join("d"));
    let _baseline_pty = pty(&c, &d);
    let mut h_pty = hist();
    {
        let (mut x, mut y) = (open(&c), open(&d));
        let mut buf = vec![0u8; SALE.len()];
        for _ in 0..n {
            let t = Instant::now();
            y.write_all(SALE).await.unwrap();
            x.read_exact(&mut buf).await.unwrap();
            h_pty.record(t.elapsed().as_micros() as u64).unwrap();
        }
    }
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let _tap_pty = pty(&a, &b);
    // The tap: serial byte to committed transaction.
    let cfg = EscposTapConfig {
        name: "tap".into(),
        lane: "1".into(),
        serial: SerialConfig::new(a.to_string_lossy()),
        receipt: ReceiptOptions::default(),
        template: TemplateConfig::default(),
        deadletter_repeat_interval_ms: 60_000,
    };
    let task = tokio::spawn(build_tap(cfg, ctx("tap")).unwrap());
    while status.get("tap").map(|s| s.state) != Some(edge_core::State::Up) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut pos = open(&b);
    let mut sub = log.subscribe();
    let mut h_tap = hist();
    for i in 0..n {
        let target = i as u64 + 2;
        let t = Instant::now();
        pos.write_all(SALE).await.unwrap();
        while log.next_seq("pos.transactions").unwrap_or(1) < target {
            sub.changed().await.unwrap();
        }
        h_tap.record(t.elapsed().as_micros() as u64).unwrap();
    }
    // Baseline 3: TCP round trip on loopback.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        while let Ok(k) = s.read(&mut buf).await {
            if k == 0 || s.write_all(&buf[..k]).await.is_err() {
                return;
            }
        }
    });
    let mut h_tcp = hist();
    {
        let mut s = TcpStream::connect(echo_addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; SALE.len()];
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(SALE).await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            h_tcp.record(t.elapsed().as_micros() as u64).unwrap();
        }
    }
    // The proxy: POS write until the printer has the cut (which waits for the commit). The
    // printer acknowledges each complete receipt with one byte back to the POS.
    let printer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let paddr = printer.local_addr().unwrap().to_string();
    // The proxy's probe between jobs (DLE EOT 1..4 on its own connection) is answered too.
    tokio::spawn(async move {
        while let Ok((mut s, _)) = printer.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = 0usize;
                while let Ok(k) = s.read(&mut buf).await {
                    if k == 0 {
                        return;
                    }
                    if buf[..k] == edge_drivers::escpos::status::PROBE_REQUEST {
                        s.write_all(&[0x12; 4]).await.unwrap();
                        continue;
                    }
                    got += k;
                    while got >= SALE.len() {
                        got -= SALE.len();
                        s.write_all(b"\x12").await.unwrap();
                    }
                }
            });
        }
    });
    let cfg = PrinterProxyConfig {
        name: "proxy".into(),
        lane: "1".into(),
        listen: "127.0.0.1:0".into(),
        printer: PrinterUpstream {
            tcp: Some(paddr),
            serial: None,
        },
        connect_timeout_ms: 2000,
        store_timeout_ms: 2000,
        allow: Vec::new(),
        idle_timeout_ms: 30_000,
        probe_interval_ms: 3_600_000,
        receipt: ReceiptOptions::default(),
        template: TemplateConfig::default(),
        deadletter_repeat_interval_ms: 60_000,
    };
    let ptask = tokio::spawn(build_proxy(cfg, ctx("proxy")).unwrap());
    let addr = loop {
        if let Some(a) = status
            .get("proxy")
            .and_then(|s| s.fields.get("listen").cloned())
        {
            break a.as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut h_proxy = hist();
    {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut b1 = [0u8; 1];
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(SALE).await.unwrap();
            s.read_exact(&mut b1).await.unwrap();
            h_proxy.record(t.elapsed().as_micros() as u64).unwrap();
        }
    }
    shutdown.stop_all();
    task.await.unwrap().unwrap();
    ptask.await.unwrap().unwrap();
    println!(
        "### Latency ({n} receipts of {} bytes each, one at a time; SQLite FULL sync, default 10 ms commit window)\n",
        SALE.len()
    );
    println!("| path | n | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    row(
        "baseline: bare log append of 2 records (receipt + transaction)",
        &h_log,
    );
    row(
        "baseline: PTY round trip (write one end, read the other)",
        &h_pty,
    );
    row(
        "**escpos_tap: serial byte written to transaction committed**",
        &h_tap,
    );
    row("baseline: TCP loopback echo round trip", &h_tcp);
    row(
        "**printer_proxy: POS write to printer answer (cut forwarded after commit)**",
        &h_proxy,
    );
    println!();
}

fn main() {
    let n: usize = std::env::var("POS_BENCH_RECEIPTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    throughput();
    if std::env::var_os("POS_BENCH_THROUGHPUT_ONLY").is_some() {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(latency(n));
}
