//! Driver families behind cargo features, and what a build without one says about its config.
//!
//! A family whose drivers need system libraries or heavy crates (D-Bus for BLE, tract for cameras)
//! is a cargo feature of `edge-drivers` (forwarded by `edge-agent`), on by default. A store build
//! without it still parses every config: a driver of a missing family is registered with
//! [`Unavailable`] as its config type, which accepts any keys and reports one problem at
//! `drivers[i].type` naming the feature. So `check-config` on a POS-only build says what is wrong
//! instead of "unknown variant".
//!
//! A gated driver's module exports its config type as an alias, e.g. in `ble`:
//! `#[cfg(feature = "ble")] pub type BluezConfig = bluez::Config;` and
//! `#[cfg(not(feature = "ble"))] pub type BluezConfig = Unavailable<Ble>;`, and the registration
//! line in `lib.rs` names the alias.

use crate::{Driver, DriverError};
use edge_core::component::{ComponentContext, Task};
use edge_core::config::{Problems, join};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::marker::PhantomData;

/// A driver family that is a cargo feature.
pub trait Family {
    /// The cargo feature (of `edge-drivers` and `edge-agent`).
    const FEATURE: &'static str;
    /// What the family's drivers read, for messages.
    const DEVICES: &'static str;
    /// Whether the feature is in the default build (the message then says so).
    const DEFAULT: bool = true;
}

/// BLE beacons (feature `ble`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ble;

impl Family for Ble {
    const FEATURE: &'static str = "ble";
    const DEVICES: &'static str = "BLE beacons";
}

/// The BlueZ source of the beacons driver (feature `bluez`, which needs `ble`; not a default
/// because it links libdbus-1). A `source = { kind = "bluez" }` in a build without it is a config
/// problem at `drivers[i].source.kind` (see [`Unavailable::problems`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bluez;

impl Family for Bluez {
    const FEATURE: &'static str = "bluez";
    const DEVICES: &'static str = "this computer's Bluetooth adapter through BlueZ over D-Bus";
    const DEFAULT: bool = false;
}

/// Cameras (feature `camera`; no driver yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Camera;

impl Family for Camera {
    const FEATURE: &'static str = "camera";
    const DEVICES: &'static str = "cameras";
}

/// The families compiled into this build, by feature name.
pub fn built() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "ble") {
        v.push(Ble::FEATURE);
    }
    if cfg!(feature = "bluez") {
        v.push(Bluez::FEATURE);
    }
    if cfg!(feature = "camera") {
        v.push(Camera::FEATURE);
    }
    v
}

/// The sentence for a config that needs family `F` in a build without it.
pub fn missing<F: Family>(what: &str) -> String {
    format!(
        "{what} needs the `{}` feature ({}), which this build of edge-agent leaves out; install a build with `{}`{} or remove this setting",
        F::FEATURE,
        F::DEVICES,
        F::FEATURE,
        if F::DEFAULT {
            " (a default feature)".to_string()
        } else {
            format!(" (not a default feature: `--features {}`)", F::FEATURE)
        }
    )
}

/// The config of a driver whose family `F` this build does not have: any keys are accepted,
/// validation reports one problem, and it never builds.
pub struct Unavailable<F> {
    name: String,
    family: PhantomData<F>,
}

impl<F> Unavailable<F> {
    pub fn new(name: impl Into<String>) -> Self {
        Unavailable {
            name: name.into(),
            family: PhantomData,
        }
    }
}

impl<F: Family> Unavailable<F> {
    /// For a part of a config (a beacon source) rather than a driver: the one problem, as
    /// (field, message), at `kind`.
    pub fn problems(&self) -> Vec<(String, String)> {
        vec![("kind".into(), missing::<F>("this source"))]
    }
}

impl<F> std::fmt::Debug for Unavailable<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unavailable")
            .field("name", &self.name)
            .finish()
    }
}

impl<F> Clone for Unavailable<F> {
    fn clone(&self) -> Self {
        Unavailable::new(self.name.clone())
    }
}

impl<F> PartialEq for Unavailable<F> {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

/// Keeps `name` (for status and the uniqueness check) and ignores every other key.
#[derive(Deserialize, Serialize)]
struct NameOnly {
    #[serde(default)]
    name: String,
}

impl<'de, F> Deserialize<'de> for Unavailable<F> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        NameOnly::deserialize(d).map(|n| Unavailable::new(n.name))
    }
}

impl<F> Serialize for Unavailable<F> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        NameOnly {
            name: self.name.clone(),
        }
        .serialize(s)
    }
}

impl<F: Family> Driver for Unavailable<F> {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        problems.push(join(path, "type"), missing::<F>("this driver"));
    }

    fn build(&self, _ctx: ComponentContext) -> Result<Task, DriverError> {
        Err(DriverError::Build {
            name: self.name.clone(),
            reason: missing::<F>("this driver"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_of_a_missing_family_parses_and_fails_validation_with_its_path() {
        let cfg: Unavailable<Ble> =
            toml::from_str("name = \"aisle-5\"\nadapter = \"hci0\"\nrssi_floor = -90\n")
                .expect("any keys are accepted");
        assert_eq!(cfg.name(), "aisle-5");
        let mut p = Problems::new();
        cfg.validate("drivers[3]", &mut p);
        let text = p.to_string();
        assert!(
            text.contains("drivers[3].type: this driver needs the `ble` feature (BLE beacons), which this build of edge-agent leaves out"),
            "{text}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let log = edge_sync::log::SqliteLog::open(dir.path(), Default::default()).expect("log");
        let ctx = ComponentContext::for_test(std::sync::Arc::new(log), "aisle-5");
        let Err(e) = cfg.build(ctx) else {
            panic!("a driver of a missing family never builds")
        };
        assert!(e.to_string().contains("`ble` feature"), "{e}");
    }

    #[test]
    fn built_families_follow_the_features() {
        assert_eq!(built().contains(&"ble"), cfg!(feature = "ble"));
        assert_eq!(built().contains(&"bluez"), cfg!(feature = "bluez"));
        assert_eq!(built().contains(&"camera"), cfg!(feature = "camera"));
    }
}
