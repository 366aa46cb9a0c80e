//! The pass-through proxy's connections: where the POS prints, the printer it forwards to (TCP
//! or serial), the relay of one POS connection with its ack-after-commit hold of each cut, and the
//! probe between jobs. What the bytes mean (receipts, records) is the parent module's; what the
//! printer says about itself is [`super::health`].

use super::health::{PrinterHealth, probe_tcp};
use super::{
    Batch, PrinterProxyConfig, ReceiptProcessor, WRITER_QUEUE, compile_template, enqueue, report,
    writer,
};
use crate::escpos::{EndReason, Segmenter, StatusReader, StatusReply};
use crate::serial::LineSettings;
use edge_core::component::{ComponentContext, Task};
use edge_core::{Event, State};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The printer end of the proxy.
enum Upstream {
    Tcp(TcpStream),
    Serial(tokio_serial::SerialStream),
}

impl Upstream {
    fn split(
        &mut self,
    ) -> (
        Box<dyn AsyncRead + Unpin + Send + '_>,
        Box<dyn AsyncWrite + Unpin + Send + '_>,
    ) {
        match self {
            Upstream::Tcp(s) => {
                let (r, w) = s.split();
                (Box::new(r), Box::new(w))
            }
            Upstream::Serial(s) => {
                let (r, w) = tokio::io::split(s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

pub fn build_proxy(cfg: PrinterProxyConfig, ctx: ComponentContext) -> Result<Task, String> {
    let template = compile_template(&cfg.template)?;
    Ok(Box::pin(async move {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let w = tokio::spawn(writer(ctx.clone(), rx));
        let mut proc = ReceiptProcessor::new(
            &ctx.store_id,
            ctx.status.name(),
            &cfg.lane,
            template,
            &cfg.receipt,
        )
        .with_dead_letter_interval(Duration::from_millis(cfg.deadletter_repeat_interval_ms));
        proxy_loop(&cfg, &mut proc, &ctx, tx).await;
        w.await.ok();
        proc.flush_dead_letters().await;
        ctx.status.set(State::Stopped, "stopped");
        Ok(())
    }))
}

async fn proxy_loop(
    cfg: &PrinterProxyConfig,
    proc: &mut ReceiptProcessor,
    ctx: &ComponentContext,
    tx: mpsc::Sender<Batch>,
) {
    let printer_name = cfg
        .printer
        .tcp
        .clone()
        .or_else(|| cfg.printer.serial.as_ref().map(|s| s.path.clone()))
        .unwrap_or_default();
    let mut health = PrinterHealth::new(ctx, &cfg.lane, &printer_name);
    // Bind (retrying: the address may be taken by a process that is still stopping).
    let listener = loop {
        match TcpListener::bind(&cfg.listen).await {
            Ok(l) => break l,
            Err(e) => {
                if !health
                    .link
                    .down_and_wait(format!("cannot listen on {}: {e}", cfg.listen))
                    .await
                {
                    return;
                }
            }
        }
    };
    let listen = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| cfg.listen.clone());
    ctx.status.field("listen", listen.clone());
    let idle = format!("listening on {listen} for the POS, printer {printer_name}");
    let probe_every = Duration::from_millis(cfg.probe_interval_ms);
    let mut serial: Option<tokio_serial::SerialStream> = None;
    // The state at start is the printer's (the first agent.device record), not "up until a POS
    // prints".
    probe(cfg, &mut health, &mut serial, &idle).await;
    let mut next_probe = Instant::now() + probe_every;
    let mut stray = vec![0u8; 256];
    // ASB messages a serial printer pushes between jobs.
    let mut idle_status = StatusReader::new();
    let mut refused = [0u64; 2];
    // The one POS connection that waits for the current one to end.
    let mut waiting: Option<(TcpStream, SocketAddr)> = None;
    loop {
        // Between jobs a serial printer may still talk (ASB); read it so its buffer never fills,
        // and notice an unplug early. A network printer is probed on the interval.
        let accepted = if let Some(next) = waiting.take() {
            Ok(next)
        } else {
            let summaries_due = proc.dead_letters_due_at();
            tokio::select! {
            _ = ctx.shutdown.intake().cancelled() => return,
            a = listener.accept() => a,
            _ = tokio::time::sleep_until(summaries_due.unwrap_or_else(Instant::now)), if summaries_due.is_some() => {
                enqueue(ctx, &tx, proc.due_dead_letters());
                continue;
            }
            _ = tokio::time::sleep_until(next_probe) => {
                // A POS that connects during the probe's I/O goes first (the probe is dropped
                // before it changed anything).
                let probed = tokio::select! {
                    _ = ctx.shutdown.intake().cancelled() => return,
                    a = listener.accept() => Err(a),
                    p = probe_printer(cfg, &mut serial) => Ok(p),
                };
                match probed {
                    Ok(p) => {
                        record_probe(&mut health, p, &idle).await;
                        next_probe = Instant::now() + probe_every;
                        continue;
                    }
                    Err(a) => a,
                }
            }
            r = async { match serial.as_mut() { Some(s) => s.read(&mut stray).await, None => std::future::pending().await } } => {
                match r {
                    Ok(n) if n > 0 => {
                        metrics::counter!("edge_printer_unsolicited_bytes_total", "driver" => ctx.status.name().to_string()).increment(n as u64);
                        let mut replies = Vec::new();
                        idle_status.push(&stray[..n], &mut replies);
                        health.observe(&replies).await;
                    }
                    other => {
                        serial = None;
                        idle_status = StatusReader::new();
                        let why = match other {
                            Ok(_) => "reported end of file".to_string(),
                            Err(e) => format!("failed: {e}"),
                        };
                        health.down(format!("reading the printer's serial port {printer_name} {why} (unplugged or switched off?); opening it again every {} ms and at the next POS connection", cfg.probe_interval_ms)).await;
                        next_probe = Instant::now() + probe_every;
                    }
                }
                continue;
            }
            }
        };
        ctx.status.field("pos_waiting", 0);
        let (pos, peer) = match accepted {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(component = ctx.status.name(), error = %e, "accepting a POS connection failed");
                continue;
            }
        };
        if !cfg.allows(peer.ip()) {
            refuse(ctx, &mut refused, peer, Refusal::NotAllowed);
            continue;
        }
        pos.set_nodelay(true).ok();
        // Connect (or reuse) the printer.
        let mut upstream = if let Some(addr) = &cfg.printer.tcp {
            match tokio::time::timeout(
                Duration::from_millis(cfg.connect_timeout_ms),
                TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => {
                    s.set_nodelay(true).ok();
                    Upstream::Tcp(s)
                }
                Ok(Err(e)) => {
                    health.down(format!("printer {addr} refused the connection: {e}; the POS connection from {peer} is closed so the POS reports the printer offline")).await;
                    continue;
                }
                Err(_) => {
                    health.down(format!("printer {addr} did not answer within {} ms; the POS connection from {peer} is closed", cfg.connect_timeout_ms)).await;
                    continue;
                }
            }
        } else {
            let Some(sc) = &cfg.printer.serial else {
                return;
            };
            let port = match serial.take() {
                Some(p) => p,
                None => match sc.open(LineSettings::N81_9600) {
                    Ok(p) => p,
                    Err(e) => {
                        health
                            .down(format!("{e}; the POS connection from {peer} is closed"))
                            .await;
                        continue;
                    }
                },
            };
            idle_status = StatusReader::new();
            Upstream::Serial(port)
        };
        health
            .up(format!("forwarding POS {peer} to printer {printer_name}"))
            .await;
        // While one POS prints, the next connection waits (a POS that closes and reconnects at
        // once for its next job is served in turn, as by a printer); a third is refused at once
        // rather than left in the backlog with no answer. The idle timeout bounds the wait.
        let outcome = {
            let relaying = relay(cfg, ctx, proc, &tx, pos, &mut upstream, &mut health);
            tokio::pin!(relaying);
            loop {
                tokio::select! {
                    o = &mut relaying => break o,
                    a = listener.accept() => if let Ok((next, peer)) = a {
                        if !cfg.allows(peer.ip()) {
                            refuse(ctx, &mut refused, peer, Refusal::NotAllowed);
                        } else if waiting.is_none() {
                            waiting = Some((next, peer));
                            ctx.status.field("pos_waiting", 1);
                        } else {
                            drop(next);
                            refuse(ctx, &mut refused, peer, Refusal::Busy);
                        }
                    },
                }
            }
        };
        ctx.status
            .field("forwarded_unstored", proc.forwarded_unstored);
        match outcome {
            Ok(()) => {
                if let Upstream::Serial(p) = upstream {
                    serial = Some(p);
                }
                // The POS left: the sentence says so (a waiting one is served next and says its own).
                health.up(idle.clone()).await;
            }
            Err(RelayEnd::Printer(why)) => health.down(why).await,
            Err(RelayEnd::Shutdown) => return,
        }
        next_probe = Instant::now() + probe_every;
    }
}

/// One probe of the printer between jobs. A network printer: connect and ask for its status
/// (`DLE EOT 1..4`), so a printer that was switched off, unplugged or has run out of paper shows
/// within one interval with no POS printing. A serial printer: open its port when it is closed
/// (an open one is read between jobs, which notices an unplug at once).
async fn probe(
    cfg: &PrinterProxyConfig,
    health: &mut PrinterHealth,
    serial: &mut Option<tokio_serial::SerialStream>,
    idle: &str,
) {
    let probed = probe_printer(cfg, serial).await;
    record_probe(health, probed, idle).await;
}

/// The I/O of a probe, with no state change: it may be dropped when a POS connects meanwhile.
async fn probe_printer(
    cfg: &PrinterProxyConfig,
    serial: &mut Option<tokio_serial::SerialStream>,
) -> Result<Vec<StatusReply>, String> {
    let every = cfg.probe_interval_ms;
    if let Some(addr) = &cfg.printer.tcp {
        probe_tcp(addr, Duration::from_millis(cfg.connect_timeout_ms))
            .await
            .map_err(|why| {
                format!("{why}; probing again every {every} ms and at the next POS connection")
            })
    } else if let Some(sc) = &cfg.printer.serial {
        if serial.is_none() {
            *serial = Some(sc.open(LineSettings::N81_9600).map_err(|e| {
                format!("{e}; opening it again every {every} ms and at the next POS connection")
            })?);
        }
        Ok(Vec::new())
    } else {
        Ok(Vec::new())
    }
}

/// What a probe found becomes the printer's state: its faults, then up; or down.
async fn record_probe(
    health: &mut PrinterHealth,
    probed: Result<Vec<StatusReply>, String>,
    idle: &str,
) {
    match probed {
        Ok(replies) => {
            health.observe(&replies).await;
            health.up(idle).await;
        }
        Err(why) => health.down(why).await,
    }
}

/// Why a POS connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Its address is not in `allow`.
    NotAllowed,
    /// One POS connection is being served and another one waits for it.
    Busy,
}

/// Closes a refused POS connection: one log line, a counter by reason, a count in status.
fn refuse(ctx: &ComponentContext, counts: &mut [u64; 2], peer: SocketAddr, why: Refusal) {
    let (reason, what, i) = match why {
        Refusal::NotAllowed => (
            "not_allowed",
            "its address is not in the driver's allow list",
            0,
        ),
        Refusal::Busy => (
            "busy",
            "one POS connection is being served and another waits; the POS sees the printer offline and retries",
            1,
        ),
    };
    counts[i] += 1;
    metrics::counter!("edge_printer_refused_connections_total", "driver" => ctx.status.name().to_string(), "reason" => reason)
        .increment(1);
    ctx.status.field(&format!("refused_{reason}"), counts[i]);
    tracing::warn!(component = ctx.status.name(), %peer, reason, "refused a POS connection: {what}");
}

enum RelayEnd {
    Printer(String),
    Shutdown,
}

async fn relay(
    cfg: &PrinterProxyConfig,
    ctx: &ComponentContext,
    proc: &mut ReceiptProcessor,
    tx: &mpsc::Sender<Batch>,
    mut pos: TcpStream,
    upstream: &mut Upstream,
    health: &mut PrinterHealth,
) -> Result<(), RelayEnd> {
    let (mut pos_r, mut pos_w) = pos.split();
    let (mut up_r, mut up_w) = upstream.split();
    let mut seg = Segmenter::new(cfg.receipt.segmenter());
    // The printer's answers to this connection's status requests, and its ASB messages.
    let mut status = StatusReader::new();
    let mut replies = Vec::new();
    let idle_gap = Duration::from_millis(cfg.receipt.idle_gap_ms);
    let store_timeout = Duration::from_millis(cfg.store_timeout_ms);
    let mut buf = vec![0u8; 8192];
    let mut rbuf = vec![0u8; 1024];
    let mut last_byte = Instant::now();
    let idle_timeout = Duration::from_millis(cfg.idle_timeout_ms);
    let mut last_activity = Instant::now();
    let end = 'relay: loop {
        let summaries_due = proc.dead_letters_due_at();
        tokio::select! {
            _ = ctx.shutdown.intake().cancelled() => break Err(RelayEnd::Shutdown),
            _ = tokio::time::sleep_until(summaries_due.unwrap_or_else(Instant::now)), if summaries_due.is_some() => {
                enqueue(ctx, tx, proc.due_dead_letters());
            }
            _ = tokio::time::sleep_until(last_activity + idle_timeout) => {
                metrics::counter!("edge_printer_idle_closed_total", "driver" => ctx.status.name().to_string()).increment(1);
                tracing::info!(component = ctx.status.name(), idle_ms = cfg.idle_timeout_ms, "closed an idle POS connection (idle_timeout_ms)");
                break Ok(());
            }
            r = pos_r.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => break Ok(()),
                    Ok(n) => n,
                };
                last_byte = Instant::now();
                last_activity = last_byte;
                let chunk = &buf[..n];
                let mut sent = 0;
                let now = edge_core::time::now_ms();
                for r in seg.push(chunk) {
                    let events = proc.events(&r, ctx, now);
                    match r.end_offset {
                        Some(e) if r.end == EndReason::Cut && e > sent && !events.is_empty() => {
                            // Forward up to the last byte of the cut; the cut completes only once
                            // the receipt is durable.
                            let hold = e - 1;
                            if let Err(e) = up_w.write_all(&chunk[sent..hold]).await {
                                break 'relay Err(RelayEnd::Printer(format!("writing to the printer failed: {e}")));
                            }
                            sent = hold;
                            if !store_and_wait(ctx, tx, events, store_timeout).await {
                                proc.forwarded_unstored += 1;
                                ctx.status.set(State::Degraded, "a receipt was forwarded to the printer before it could be stored (local log slow or full)");
                            }
                        }
                        _ => enqueue(ctx, tx, events),
                    }
                }
                for n in seg.take_status_requests() {
                    status.requested(n);
                }
                if let Err(e) = up_w.write_all(&chunk[sent..]).await {
                    break 'relay Err(RelayEnd::Printer(format!("writing to the printer failed: {e}")));
                }
                report(ctx, proc, &seg);
            }
            r = up_r.read(&mut rbuf) => {
                match r {
                    Ok(0) => break Err(RelayEnd::Printer("the printer closed the connection".into())),
                    Err(e) => break Err(RelayEnd::Printer(format!("reading from the printer failed: {e}"))),
                    Ok(m) => {
                        last_activity = Instant::now();
                        // Status replies (DLE EOT, GS r) and ASB go back to the POS unchanged,
                        // then tell the agent about the printer's faults.
                        if pos_w.write_all(&rbuf[..m]).await.is_err() {
                            break Ok(());
                        }
                        status.push(&rbuf[..m], &mut replies);
                        if !replies.is_empty() {
                            health.observe(&replies).await;
                            replies.clear();
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(last_byte + idle_gap), if seg.in_progress() => {
                let now = edge_core::time::now_ms();
                for r in seg.idle(EndReason::IdleGap) {
                    enqueue(ctx, tx, proc.events(&r, ctx, now));
                }
            }
        }
    };
    up_w.flush().await.ok();
    let now = edge_core::time::now_ms();
    for r in seg.idle(EndReason::StreamEnd) {
        enqueue(ctx, tx, proc.events(&r, ctx, now));
    }
    report(ctx, proc, &seg);
    proc.segmenter_done(&seg);
    end
}

/// Hands a receipt's records to the writer and waits until they are durable, at most `timeout`.
async fn store_and_wait(
    ctx: &ComponentContext,
    tx: &mpsc::Sender<Batch>,
    events: Vec<Event>,
    timeout: Duration,
) -> bool {
    let (ack, done) = oneshot::channel();
    let deadline = Instant::now() + timeout;
    let sent = tokio::time::timeout_at(
        deadline,
        tx.send(Batch {
            events,
            ack: Some(ack),
        }),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        metrics::counter!("edge_pos_receipts_dropped_total", "driver" => ctx.status.name().to_string(), "reason" => "queue_full").increment(1);
        return false;
    }
    matches!(tokio::time::timeout_at(deadline, done).await, Ok(Ok(true)))
}
