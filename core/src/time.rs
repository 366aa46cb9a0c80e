//! Wall-clock helpers. All timestamps in edge-agent are milliseconds since the Unix epoch (UTC), the
//! unit Kafka uses for record timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. A clock before 1970 (a Pi without RTC before NTP sync) yields 0
/// rather than a panic; the ingest timestamp is informational, ordering comes from `seq`.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
