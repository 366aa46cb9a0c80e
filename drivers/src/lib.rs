//! Device drivers: each turns a device (or a simulation of one) into events in the local log.
//!
//! A driver is configured by one variant of the closed [`DriverConfig`] enum (`[[drivers]]` entries
//! in the agent config, `type = "..."`). [`DriverConfig::build`] checks what it can without I/O and
//! returns a [`Task`] that owns the device: its reconnect loop, its status, and its writes to the
//! log. A driver never blocks the reactor on device I/O and never drops an event silently: what it
//! cannot store is counted by reason.
//!
//! POS devices: [`printer`] (`escpos_tap`, `printer_proxy`) on top of [`escpos`] (tokenizer, code
//! pages, receipt segmentation) and [`receipt`] (templates, transactions); [`scanner`]; [`scale`];
//! [`display`] (customer pole display). [`serial`] is the shared serial transport and [`link`] the
//! up/down reporting, backoff, backpressure and dead letters every device driver uses. The
//! configuration reference is `docs/CONFIGURATION-drivers.md`, the payload schemas `docs/schemas/`.

pub mod display;
pub mod escpos;
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

/// One `[[drivers]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DriverConfig {
    /// Generated POS transactions, scans and beacon sightings, for demos and for stores where a
    /// device is not installed yet.
    Simulated(simulated::SimulatedConfig),
    /// Read-only tap on the serial line between a POS and its ESC/POS receipt printer.
    EscposTap(printer::EscposTapConfig),
    /// TCP (9100) pass-through in front of the receipt printer (network or serial).
    PrinterProxy(printer::PrinterProxyConfig),
    /// Barcode scanner on a serial line.
    Scanner(scanner::ScannerConfig),
    /// Scale polled over a serial line (Toledo 8217 or SMA).
    Scale(scale::ScaleConfig),
    /// Customer pole display showing offers for a lane.
    CustomerDisplay(display::CustomerDisplayConfig),
}

impl DriverConfig {
    /// The driver's unique name (component name in status and metrics).
    pub fn name(&self) -> &str {
        match self {
            DriverConfig::Simulated(c) => &c.name,
            DriverConfig::EscposTap(c) => &c.name,
            DriverConfig::PrinterProxy(c) => &c.name,
            DriverConfig::Scanner(c) => &c.name,
            DriverConfig::Scale(c) => &c.name,
            DriverConfig::CustomerDisplay(c) => &c.name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DriverConfig::Simulated(_) => "simulated",
            DriverConfig::EscposTap(_) => "escpos_tap",
            DriverConfig::PrinterProxy(_) => "printer_proxy",
            DriverConfig::Scanner(_) => "scanner",
            DriverConfig::Scale(_) => "scale",
            DriverConfig::CustomerDisplay(_) => "customer_display",
        }
    }

    /// Device paths or addresses this driver opens exclusively (a path named twice is an error).
    pub fn exclusive_resources(&self) -> Vec<String> {
        match self {
            DriverConfig::Simulated(_) => Vec::new(),
            DriverConfig::EscposTap(c) => vec![c.serial.path.clone()],
            DriverConfig::PrinterProxy(c) => c.exclusive_resources(),
            DriverConfig::Scanner(c) => vec![c.serial.path.clone()],
            DriverConfig::Scale(c) => vec![c.serial.path.clone()],
            DriverConfig::CustomerDisplay(c) => vec![c.serial.path.clone()],
        }
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        match self {
            DriverConfig::Simulated(c) => c.validate(path, problems),
            DriverConfig::EscposTap(c) => c.validate(path, problems),
            DriverConfig::PrinterProxy(c) => c.validate(path, problems),
            DriverConfig::Scanner(c) => c.validate(path, problems),
            DriverConfig::Scale(c) => c.validate(path, problems),
            DriverConfig::CustomerDisplay(c) => c.validate(path, problems),
        }
    }

    pub fn build(&self, ctx: ComponentContext) -> Result<Task, DriverError> {
        match self {
            DriverConfig::Simulated(c) => Ok(simulated::build(c.clone(), ctx)),
            DriverConfig::EscposTap(c) => {
                printer::build_tap(c.clone(), ctx).map_err(|reason| DriverError::Build {
                    name: c.name.clone(),
                    reason,
                })
            }
            DriverConfig::PrinterProxy(c) => {
                printer::build_proxy(c.clone(), ctx).map_err(|reason| DriverError::Build {
                    name: c.name.clone(),
                    reason,
                })
            }
            DriverConfig::Scanner(c) => Ok(scanner::build(c.clone(), ctx)),
            DriverConfig::Scale(c) => Ok(scale::build(c.clone(), ctx)),
            DriverConfig::CustomerDisplay(c) => Ok(display::build(c.clone(), ctx)),
        }
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
            assert!(p.is_empty(), "{p}\n{src}");
            blocks += 1;
        }
        assert!(blocks >= 7, "{blocks} examples");
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
