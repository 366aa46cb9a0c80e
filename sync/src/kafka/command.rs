//! Commands from HQ that the uplink executes, read from the local `hq.commands` stream (the
//! downlink writes HQ's `hq.commands` topic there, exactly once).
//!
//! ```json
//! {"schema": "edge.command/1", "command": "remirror", "stream": "pos.transactions", "from_seq": 1200}
//! ```
//!
//! `remirror` sends a stream again from `from_seq` (HQ-side recovery, e.g. after HQ lost a topic).
//! The records carry their original identity and the header `edge.replay: 1`. An optional
//! `"epoch"` restricts the command to that incarnation of the local log. Commands with another
//! `command` value are meant for other components and are skipped.

use serde::Deserialize;
use uuid::Uuid;

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
        Some("remirror") => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| format!("remirror command is malformed: {e}")),
        Some(_) => Ok(None),
        None => Err("command has no \"command\" field".into()),
    }
}

#[cfg(test)]
mod tests {
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
    }
}
