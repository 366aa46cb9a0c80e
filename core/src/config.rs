//! Config primitives shared by all components.
//!
//! Components own their typed config structs (serde, `deny_unknown_fields`); each offers a
//! `validate(&self, path, &mut Problems)` pass that reports *every* problem with its path, so that
//! `edge-agent check-config` can print them all at once.

use std::fmt;

pub use bytesize::ByteSize;

/// One config problem: where it is and what is wrong, as a sentence an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Collects every problem of a config instead of stopping at the first.
#[derive(Debug, Default, Clone)]
pub struct Problems(Vec<Problem>);

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Problem> {
        self.0.iter()
    }
    pub fn into_vec(self) -> Vec<Problem> {
        self.0
    }
    pub fn extend(&mut self, other: Problems) {
        self.0.extend(other.0)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.0 {
            writeln!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Joins a config path and a field name: `join("mqtt", "port") == "mqtt.port"`.
pub fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Local stream names: lowercase ASCII letters, digits, `.`, `_` and `-`, 1..=100 chars, no leading
/// or trailing dot. They become Kafka topic name parts, so the rules follow Kafka's legal characters.
pub fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 100 {
        return Err(format!("stream name {name:?} must be 1 to 100 characters"));
    }
    if name.starts_with('.') || name.ends_with('.') {
        return Err(format!(
            "stream name {name:?} must not start or end with '.'"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "stream name {name:?} contains {c:?}; use lowercase letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        assert!(check_stream_name("pos.transactions").is_ok());
        assert!(check_stream_name("agent.health").is_ok());
        assert!(check_stream_name("").is_err());
        assert!(check_stream_name("POS").is_err());
        assert!(check_stream_name("a/b").is_err());
        assert!(check_stream_name(".x").is_err());
    }

    #[test]
    fn problems_print_with_paths() {
        let mut p = Problems::new();
        p.push(join("mqtt", "port"), "must not be 0");
        p.push("log.commit_window_ms", "must be between 1 and 1000");
        assert_eq!(
            p.to_string(),
            "mqtt.port: must not be 0\nlog.commit_window_ms: must be between 1 and 1000\n"
        );
    }
}
