//! The serial tap: reads the POS-to-printer line (read only) and hands its bytes to the receipt
//! segmentation, reopening the port after an unplug. It sees only the POS's side, so it reports no
//! printer faults.

use super::{
    Batch, EscposTapConfig, ReceiptProcessor, WRITER_QUEUE, compile_template, enqueue, report,
    writer,
};
use crate::escpos::{EndReason, Segmenter};
use crate::link::DeviceLink;
use crate::serial::LineSettings;
use edge_core::State;
use edge_core::component::{ComponentContext, Task};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub fn build_tap(cfg: EscposTapConfig, ctx: ComponentContext) -> Result<Task, String> {
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
        tap_loop(&cfg, &mut proc, &ctx, tx).await;
        w.await.ok();
        proc.flush_dead_letters().await;
        ctx.status.set(State::Stopped, "stopped");
        Ok(())
    }))
}

async fn tap_loop(
    cfg: &EscposTapConfig,
    proc: &mut ReceiptProcessor,
    ctx: &ComponentContext,
    tx: mpsc::Sender<Batch>,
) {
    let mut link = DeviceLink::new(ctx.clone(), "receipt_printer_tap", cfg.serial.path.clone());
    let idle_gap = Duration::from_millis(cfg.receipt.idle_gap_ms);
    let settings = cfg.serial.settings(LineSettings::N81_9600);
    while !ctx.shutdown.intake().is_cancelled() {
        let mut port = match cfg.serial.open(LineSettings::N81_9600) {
            Ok(p) => p,
            Err(e) => {
                if !link.down_and_wait(e).await {
                    break;
                }
                continue;
            }
        };
        link.up(format!("tapping {} ({settings})", cfg.serial.path))
            .await;
        let mut seg = Segmenter::new(cfg.receipt.segmenter());
        let mut buf = vec![0u8; 4096];
        let mut last_byte = Instant::now();
        let reason = loop {
            let idle_at = last_byte + idle_gap;
            let summaries_due = proc.dead_letters_due_at();
            tokio::select! {
                _ = ctx.shutdown.intake().cancelled() => break None,
                _ = tokio::time::sleep_until(summaries_due.unwrap_or_else(Instant::now)), if summaries_due.is_some() => {
                    enqueue(ctx, &tx, proc.due_dead_letters());
                }
                r = port.read(&mut buf) => match r {
                    Ok(0) => break Some("the serial port reported end of file (device unplugged?)".to_string()),
                    Ok(n) => {
                        last_byte = Instant::now();
                        let now = edge_core::time::now_ms();
                        for r in seg.push(&buf[..n]) {
                            enqueue(ctx, &tx, proc.events(&r, ctx, now));
                        }
                        report(ctx, proc, &seg);
                    }
                    Err(e) => break Some(format!("reading {} failed: {e} (device unplugged?)", cfg.serial.path)),
                },
                _ = tokio::time::sleep_until(idle_at), if seg.in_progress() => {
                    let now = edge_core::time::now_ms();
                    for r in seg.idle(EndReason::IdleGap) {
                        enqueue(ctx, &tx, proc.events(&r, ctx, now));
                    }
                    report(ctx, proc, &seg);
                }
            }
        };
        let now = edge_core::time::now_ms();
        for r in seg.idle(EndReason::StreamEnd) {
            enqueue(ctx, &tx, proc.events(&r, ctx, now));
        }
        report(ctx, proc, &seg);
        proc.segmenter_done(&seg);
        drop(port);
        match reason {
            None => break,
            Some(why) => {
                if !link.down_and_wait(why).await {
                    break;
                }
            }
        }
    }
}
