//! Device drivers: each turns a device (or a simulation of one) into events in the local log.
//!
//! A driver is configured by one variant of the closed [`DriverConfig`] enum (`[[drivers]]` entries
//! in the agent config, `type = "..."`). Each variant's config implements [`Driver`]: its name, the
//! devices it opens exclusively, `validate` (every problem with its path, no I/O) and `build`, which
//! returns a [`Task`] that owns the device: its reconnect loop, its status, and its writes to the
//! log. A driver never blocks the reactor on device I/O and never drops an event silently: what it
//! cannot store is counted by reason.
//!
//! **Adding a driver** is one module with a config type that implements [`Driver`], plus one line in
//! the `drivers!` registration below (variant, config type, `type` name). Nothing else matches on the
//! variants.
//!
//! **Families and features.** Drivers that need system libraries or heavy crates are grouped into
//! families behind cargo features (see [`family`]): `ble` (BLE beacons; today the simulated beacon
//! sightings of [`simulated`]) and `camera` (no driver yet), both on by default. A POS-only build
//! (`--no-default-features`) still accepts a config that names a missing family and reports it as a
//! config problem with its path, instead of failing to parse.
//!
//! POS devices: [`printer`] (`escpos_tap`, `printer_proxy`) on top of [`escpos`] (tokenizer, code
//! pages, receipt segmentation) and [`receipt`] (templates, transactions); [`scanner`]; [`scale`];
//! [`display`] (customer pole display). [`serial`] is the shared serial transport, [`link`] the
//! up/down reporting, device backoff and backpressure every device driver uses, and
//! [`deadletters`] its dead letters, repeats of one error aggregated with a count. The
//! configuration reference is `docs/CONFIGURATION-drivers.md`, the payload schemas `docs/schemas/`.

#[cfg(feature = "ble")]
pub mod ble;
pub mod deadletters;
pub mod display;
pub mod escpos;
pub mod family;
pub mod fuzzing;
pub mod link;
pub mod printer;
pub mod receipt;
pub mod scale;
pub mod scanner;
pub mod serial;
pub mod simulated;

use edge_core::component::{ComponentContext, Task};
use edge_core::config::{Problems, join};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("driver {name}: {reason}")]
    Build { name: String, reason: String },
}

/// What every driver's config provides; [`DriverConfig`] dispatches to it.
pub trait Driver {
    /// The driver's unique name (component name in status and metrics).
    fn name(&self) -> &str;

    /// Device paths or addresses this driver opens exclusively (a path named twice is an error).
    fn exclusive_resources(&self) -> Vec<String> {
        Vec::new()
    }

    /// Checks the config without I/O; every problem is pushed with its path under `path`.
    fn validate(&self, path: &str, problems: &mut Problems);

    /// Builds the running driver. Fails only on what `validate` cannot see.
    fn build(&self, ctx: ComponentContext) -> Result<Task, DriverError>;
}

/// The registration point: one line per driver. It defines the [`DriverConfig`] variants (serde
/// `type` = the quoted name), [`DriverConfig::kind`] and the one dispatch to [`Driver`].
macro_rules! drivers {
    ($( $(#[$doc:meta])* $variant:ident($config:ty) = $kind:literal, )*) => {
        /// One `[[drivers]]` entry.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type")]
        pub enum DriverConfig {
            $( $(#[$doc])* #[serde(rename = $kind)] $variant($config), )*
        }

        impl DriverConfig {
            /// Every `type` this build accepts.
            pub const KINDS: &[&str] = &[$($kind),*];

            /// The driver's `type` (its component kind in status).
            pub fn kind(&self) -> &'static str {
                match self { $( DriverConfig::$variant(_) => $kind, )* }
            }

            /// The driver behind this entry.
            pub fn as_driver(&self) -> &dyn Driver {
                match self { $( DriverConfig::$variant(c) => c as &dyn Driver, )* }
            }
        }
    };
}

drivers! {
    /// Generated POS transactions, scans and (feature `ble`) beacon sightings, for demos and for
    /// stores where a device is not installed yet.
    Simulated(simulated::SimulatedConfig) = "simulated",
    /// Read-only tap on the serial line between a POS and its ESC/POS receipt printer.
    EscposTap(printer::EscposTapConfig) = "escpos_tap",
    /// TCP (9100) pass-through in front of the receipt printer (network or serial).
    PrinterProxy(printer::PrinterProxyConfig) = "printer_proxy",
    /// Barcode scanner on a serial line.
    Scanner(scanner::ScannerConfig) = "scanner",
    /// Scale polled over a serial line (Toledo 8217 or SMA).
    Scale(scale::ScaleConfig) = "scale",
    /// Customer pole display showing offers for a lane.
    CustomerDisplay(display::CustomerDisplayConfig) = "customer_display",
    /// Presence engine (feature `ble`): beacon sightings to enter/exit/dwell per zone.
    Presence(PresenceConfig) = "presence",
    /// BLE beacons (feature `ble`): a replay file or remote receivers to beacon sightings.
    Beacons(BeaconsConfig) = "beacons",
}

/// The beacon driver's config (`[[drivers]] type = "beacons"`; feature `ble`).
#[cfg(feature = "ble")]
pub type BeaconsConfig = ble::beacons::BeaconsConfig;
/// The beacon driver's config in a build without `ble`: reported as a config problem.
#[cfg(not(feature = "ble"))]
pub type BeaconsConfig = family::Unavailable<family::Ble>;

/// The presence engine's config (`[[drivers]] type = "presence"`; feature `ble`).
#[cfg(feature = "ble")]
pub type PresenceConfig = ble::presence::PresenceConfig;
/// The presence engine's config in a build without `ble`: reported as a config problem.
#[cfg(not(feature = "ble"))]
pub type PresenceConfig = family::Unavailable<family::Ble>;

impl DriverConfig {
    /// The driver's unique name (component name in status and metrics).
    pub fn name(&self) -> &str {
        self.as_driver().name()
    }

    /// Device paths or addresses this driver opens exclusively (a path named twice is an error).
    pub fn exclusive_resources(&self) -> Vec<String> {
        self.as_driver().exclusive_resources()
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        self.as_driver().validate(path, problems)
    }

    pub fn build(&self, ctx: ComponentContext) -> Result<Task, DriverError> {
        self.as_driver().build(ctx)
    }
}

/// Validates every driver and the rules between them (unique names, a device opened once).
pub fn validate_drivers(drivers: &[DriverConfig], path: &str, problems: &mut Problems) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut resources: HashMap<String, usize> = HashMap::new();
    for (i, d) in drivers.iter().enumerate() {
        let p = format!("{path}[{i}]");
        d.validate(&p, problems);
        if d.name().is_empty() {
            problems.push(join(&p, "name"), "must not be empty");
        } else if let Some(first) = names.insert(d.name(), i) {
            problems.push(
                join(&p, "name"),
                format!(
                    "{:?} is also the name of {path}[{first}]; driver names must be unique",
                    d.name()
                ),
            );
        }
        for r in d.exclusive_resources() {
            if let Some(first) = resources.insert(r.clone(), i) {
                problems.push(
                    p.clone(),
                    format!("{r} is also used by {path}[{first}]; a device can be opened by one driver only"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        drivers: Vec<DriverConfig>,
    }

    /// Every TOML example in the configuration reference parses and validates.
    #[test]
    fn configuration_reference_examples_are_valid() {
        let text = include_str!("../../docs/CONFIGURATION-drivers.md");
        let mut blocks = 0;
        for block in text.split("```toml\n").skip(1) {
            let body = block.split("```").next().unwrap_or_default();
            let src = if body.starts_with("[[drivers]]") {
                body.to_string()
            } else {
                format!(
                    "[[drivers]]\ntype = \"escpos_tap\"\nname = \"x\"\nlane = \"1\"\nserial = {{ path = \"/dev/ttyS9\" }}\n{body}"
                )
            };
            let doc: Doc = toml::from_str(&src).unwrap_or_else(|e| panic!("{e}\n{src}"));
            let mut p = Problems::new();
            validate_drivers(&doc.drivers, "drivers", &mut p);
            if !cfg!(feature = "ble")
                && (src.contains("type = \"presence\"") || src.contains("type = \"beacons\""))
            {
                // A build without the family reads the example and says what it lacks.
                assert!(p.to_string().contains("the `ble` feature"), "{p}\n{src}");
            } else if !cfg!(feature = "bluez") && src.contains("kind = \"bluez\"") {
                // The BlueZ source is not a default feature: the example says what it lacks.
                assert!(
                    p.to_string()
                        .contains(".source.kind: this source needs the `bluez` feature"),
                    "{p}\n{src}"
                );
            } else {
                assert!(p.is_empty(), "{p}\n{src}");
            }
            // The registered kind is the `type` the entry was written with.
            let raw: toml::Table = toml::from_str(&src).unwrap_or_else(|e| panic!("{e}"));
            let types = raw["drivers"].as_array().map(|a| {
                a.iter()
                    .map(|d| d["type"].as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
            });
            let kinds: Vec<String> = doc.drivers.iter().map(|d| d.kind().to_string()).collect();
            assert_eq!(types, Some(kinds), "{src}");
            blocks += 1;
        }
        assert!(blocks >= 7, "{blocks} examples");
    }

    /// Every registered driver round-trips through its `type`, and `kind()` is that `type`.
    #[test]
    fn every_registered_kind_is_its_serde_type() {
        for kind in DriverConfig::KINDS {
            let src = format!("[[drivers]]\ntype = \"{kind}\"\n");
            let Err(e) = toml::from_str::<Doc>(&src) else {
                continue; // a type with no required keys (e.g. `simulated`) parses as is
            };
            let e = e.to_string();
            assert!(
                !e.contains("unknown variant"),
                "{kind} is a registered type: {e}"
            );
        }
        let d: Doc = toml::from_str("[[drivers]]\ntype = \"simulated\"\nname = \"sim\"\n").unwrap();
        assert_eq!(d.drivers[0].kind(), "simulated");
        assert_eq!(d.drivers[0].name(), "sim");
        assert!(d.drivers[0].exclusive_resources().is_empty());
        let bad = toml::from_str::<Doc>("[[drivers]]\ntype = \"bluetooth\"\nname = \"x\"\n");
        let e = bad.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("unknown variant `bluetooth`, expected one of `simulated`, `escpos_tap`"),
            "{e}"
        );
    }

    /// Without the `ble` feature, simulated beacon sightings are off by default, and asking for
    /// them is a config problem that names the feature (not a parse error).
    #[cfg(not(feature = "ble"))]
    #[test]
    fn without_ble_simulated_sightings_are_a_config_problem() {
        let d: Doc = toml::from_str("[[drivers]]\ntype = \"simulated\"\nname = \"sim\"\n").unwrap();
        let mut p = Problems::new();
        validate_drivers(&d.drivers, "drivers", &mut p);
        assert!(p.is_empty(), "a POS-only simulated lane is valid: {p}");
        let d: Doc = toml::from_str(
            "[[drivers]]\ntype = \"simulated\"\nname = \"sim\"\nsightings_per_second = 2.0\n",
        )
        .unwrap();
        let mut p = Problems::new();
        validate_drivers(&d.drivers, "drivers", &mut p);
        let text = p.to_string();
        assert!(
            text.contains("drivers[0].sightings_per_second: generating beacon sightings needs the `ble` feature"),
            "{text}"
        );
    }

    #[cfg(feature = "ble")]
    #[test]
    fn with_ble_simulated_sightings_are_on_by_default() {
        let d: Doc = toml::from_str("[[drivers]]\ntype = \"simulated\"\nname = \"sim\"\n").unwrap();
        let DriverConfig::Simulated(c) = &d.drivers[0] else {
            panic!("a simulated driver")
        };
        assert_eq!(c.sightings_per_second, 2.0);
        let mut p = Problems::new();
        validate_drivers(&d.drivers, "drivers", &mut p);
        assert!(p.is_empty(), "{p}");
    }

    #[test]
    fn a_port_named_twice_is_a_config_error() {
        let doc: Doc = toml::from_str(
            r#"
[[drivers]]
type = "scanner"
name = "a"
lane = "1"
serial = { path = "/dev/ttyUSB0" }
[[drivers]]
type = "scale"
name = "b"
lane = "1"
protocol = "toledo"
serial = { path = "/dev/ttyUSB0", baud_rate = 12345 }
[[drivers]]
type = "escpos_tap"
name = "c"
lane = ""
serial = { path = "/dev/ttyUSB1" }
template = { total = "TOTAL (" }
"#,
        )
        .unwrap();
        let mut p = Problems::new();
        validate_drivers(&doc.drivers, "drivers", &mut p);
        let text = p.to_string();
        assert!(
            text.contains("drivers[1]: /dev/ttyUSB0 is also used by drivers[0]"),
            "{text}"
        );
        assert!(text.contains("drivers[1].serial.baud_rate:"), "{text}");
        assert!(text.contains("drivers[2].lane:"), "{text}");
        assert!(
            text.contains("drivers[2].template.total: is not a valid regular expression"),
            "{text}"
        );
        let bad: Result<Doc, _> = toml::from_str(
            "[[drivers]]\ntype = \"scanner\"\nname = \"a\"\nlane = \"1\"\nserial = { path = \"/dev/x\", baud = 9600 }\n",
        );
        assert!(bad.is_err(), "unknown keys are refused");
    }
}
