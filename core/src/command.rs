//! Commands from HQ, read from the local `hq.commands` stream (the downlink writes HQ's
//! `hq.commands` topic there, exactly once, after [`crate::downlink::admit`] checked them).
//!
//! ```json
//! {"schema": "edge.command/1", "command": "remirror", "stream": "pos.transactions", "from_seq": 1200}
//! ```
//!
//! `remirror` sends a stream again from `from_seq` (HQ-side recovery, e.g. after HQ lost a topic).
//! The records carry their original identity and the header `edge.replay: 1`. An optional
//! `"epoch"` restricts the command to that incarnation of the local log. Commands with another
//! `command` value are meant for other components and are skipped by the uplink.
//!
//! Bounds: `stream` is one legal stream name (no pattern, no `*`), `from_seq` is between 1 and
//! [`MAX_SEQ`] (a seq the log can hold). A command reaches a store only when it names that store
//! (see [`crate::downlink`]), so no command re-sends every store's history at once.

use crate::config::check_stream_name;
use serde::Deserialize;
use uuid::Uuid;

/// The largest seq the log stores (SQLite integers are signed 64-bit).
pub const MAX_SEQ: u64 = i64::MAX as u64;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Remirror {
        stream: String,
        from_seq: u64,
        #[serde(default)]
        epoch: Option<Uuid>,
    },
}

/// Parses a command record. `Ok(None)`: a command for another component. `Err`: a malformed
/// uplink command (reason as a sentence).
pub fn parse(payload: &[u8]) -> Result<Option<Command>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("command is not JSON: {e}"))?;
    match v.get("command").and_then(|c| c.as_str()) {
        Some("remirror") => {
            let c: Command = serde_json::from_value(v)
                .map_err(|e| format!("remirror command is malformed: {e}"))?;
            let Command::Remirror {
                stream, from_seq, ..
            } = &c;
            check_stream_name(stream).map_err(|e| format!("remirror command: {e}"))?;
            if !(1..=MAX_SEQ).contains(from_seq) {
                return Err(format!(
                    "remirror command: from_seq is {from_seq}; seqs start at 1 and end at {MAX_SEQ}"
                ));
            }
            Ok(Some(c))
        }
        Some(_) => Ok(None),
        None => Err("command has no \"command\" field".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn remirror_commands_parse() {
        let c = parse(br#"{"schema":"edge.command/1","command":"remirror","stream":"pos.scans","from_seq":5}"#)
            .unwrap();
        assert_eq!(
            c,
            Some(Command::Remirror {
                stream: "pos.scans".into(),
                from_seq: 5,
                epoch: None
            })
        );
        assert_eq!(
            parse(br#"{"command":"reload_model","model":"x"}"#).unwrap(),
            None
        );
        assert!(parse(br#"{"command":"remirror","stream":"x"}"#).is_err());
        assert!(parse(b"not json").is_err());
        assert!(parse(b"[]").is_err());
    }

    #[test]
    fn remirror_bounds() {
        for bad in [
            r#"{"command":"remirror","stream":"*","from_seq":1}"#,
            r#"{"command":"remirror","stream":"pos.*","from_seq":1}"#,
            r#"{"command":"remirror","stream":"","from_seq":1}"#,
            r#"{"command":"remirror","stream":"pos.scans","from_seq":0}"#,
            r#"{"command":"remirror","stream":"pos.scans","from_seq":-1}"#,
            r#"{"command":"remirror","stream":"pos.scans","from_seq":9223372036854775808}"#,
            r#"{"command":"remirror","stream":"pos.scans","from_seq":1.5}"#,
            r#"{"command":"remirror","stream":"pos.scans","from_seq":1,"epoch":"yesterday"}"#,
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(
            parse(br#"{"command":"remirror","stream":"pos.scans","from_seq":9223372036854775807}"#)
                .is_ok()
        );
    }
}
