//! Eviction classes of local streams.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The eviction class of a stream. When the disk budget is exceeded the log evicts the lowest class
/// first; unmirrored records of [`Priority::Protected`] streams are never evicted (intake gets
/// backpressure instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low = 0,
    Normal = 1,
    High = 2,
    Protected = 3,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Protected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Protected => "protected",
        }
    }

    pub fn as_i64(self) -> i64 {
        self as i64
    }

    pub fn from_i64(v: i64) -> Option<Priority> {
        Self::ALL.into_iter().find(|p| p.as_i64() == v)
    }

    /// The class PRODUCT.md assigns to the well-known local streams. Unknown streams are `normal`;
    /// config can override any stream.
    pub fn default_for_stream(stream: &str) -> Priority {
        match stream {
            "pos.receipts" | "pos.transactions" | "hq.prices" | "hq.campaigns" | "hq.models"
            | "hq.commands" => Priority::Protected,
            "pos.scans" | "pos.exceptions" | "scale.weights" | "presence.events"
            | "offers.decisions" => Priority::High,
            "beacon.sightings" => Priority::Low,
            _ => Priority::Normal,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("unknown priority class {s:?} (expected low, normal, high or protected)")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_table_classes() {
        assert_eq!(
            Priority::default_for_stream("pos.transactions"),
            Priority::Protected
        );
        assert_eq!(
            Priority::default_for_stream("hq.models"),
            Priority::Protected
        );
        assert_eq!(
            Priority::default_for_stream("presence.events"),
            Priority::High
        );
        assert_eq!(
            Priority::default_for_stream("beacon.sightings"),
            Priority::Low
        );
        assert_eq!(
            Priority::default_for_stream("camera.counts"),
            Priority::Normal
        );
        assert!(Priority::Low < Priority::Protected);
        assert_eq!("high".parse::<Priority>(), Ok(Priority::High));
        assert!("urgent".parse::<Priority>().is_err());
    }
}
