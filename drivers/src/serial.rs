//! The serial transport every serial driver shares: port settings from config, an exclusive open
//! on the reactor (tokio-serial, no blocking reads), and the errors an operator can act on.
//!
//! Retail devices: receipt printers and scanners 9600 8N1, Toledo-protocol scales 9600 7E1, some
//! pole displays 4800 7O1. Ports are named by path, preferably `/dev/serial/by-id/...` (stable
//! across replugs and reboots). A port is opened exclusively (TIOCEXCL plus an advisory lock), so
//! a second process or driver on the same port fails to open instead of stealing bytes.

use edge_core::config::{Problems, join};
use serde::{Deserialize, Serialize};
use tokio_serial::SerialPortBuilderExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

/// `[drivers.serial]`: where the device is and how the line is set up. Unset fields take the
/// driver's defaults (8N1 for most devices, 7E1 for Toledo scales).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Device path, e.g. `/dev/ttyUSB0` or `/dev/serial/by-id/usb-FTDI_...-if00-port0`.
    pub path: String,
    pub baud_rate: Option<u32>,
    /// 5, 6, 7 or 8.
    pub data_bits: Option<u8>,
    pub parity: Option<Parity>,
    /// 1 or 2.
    pub stop_bits: Option<u8>,
    pub flow_control: Option<FlowControl>,
}

/// Which device a path resolves to (symlinks followed): `/dev/serial/by-id/...` or a PTY link
/// that now names another device has another identity, although the path is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceIdentity {
    dev: u64,
    ino: u64,
    rdev: u64,
}

impl DeviceIdentity {
    pub fn of(path: &str) -> std::io::Result<DeviceIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(DeviceIdentity {
            dev: m.dev(),
            ino: m.ino(),
            rdev: m.rdev(),
        })
    }
}

/// Line settings with every field decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    pub baud_rate: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub flow_control: FlowControl,
}

impl LineSettings {
    pub const N81_9600: LineSettings = LineSettings {
        baud_rate: 9600,
        data_bits: 8,
        parity: Parity::None,
        stop_bits: 1,
        flow_control: FlowControl::None,
    };
    pub const E71_9600: LineSettings = LineSettings {
        baud_rate: 9600,
        data_bits: 7,
        parity: Parity::Even,
        stop_bits: 1,
        flow_control: FlowControl::None,
    };
}

impl std::fmt::Display for LineSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.parity {
            Parity::None => 'N',
            Parity::Odd => 'O',
            Parity::Even => 'E',
        };
        write!(
            f,
            "{} {}{}{}",
            self.baud_rate, self.data_bits, p, self.stop_bits
        )?;
        match self.flow_control {
            FlowControl::None => Ok(()),
            FlowControl::Software => f.write_str(" xon/xoff"),
            FlowControl::Hardware => f.write_str(" rts/cts"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot open serial port {path} ({settings}): {reason}")]
    Open {
        path: String,
        settings: String,
        reason: String,
    },
}

const BAUD_RATES: &[u32] = &[
    300, 600, 1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200, 230400,
];

impl SerialConfig {
    pub fn new(path: impl Into<String>) -> SerialConfig {
        SerialConfig {
            path: path.into(),
            baud_rate: None,
            data_bits: None,
            parity: None,
            stop_bits: None,
            flow_control: None,
        }
    }

    pub fn settings(&self, defaults: LineSettings) -> LineSettings {
        LineSettings {
            baud_rate: self.baud_rate.unwrap_or(defaults.baud_rate),
            data_bits: self.data_bits.unwrap_or(defaults.data_bits),
            parity: self.parity.unwrap_or(defaults.parity),
            stop_bits: self.stop_bits.unwrap_or(defaults.stop_bits),
            flow_control: self.flow_control.unwrap_or(defaults.flow_control),
        }
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.path.trim().is_empty() {
            problems.push(
                join(path, "path"),
                "must name the device, e.g. /dev/serial/by-id/usb-...",
            );
        } else if !self.path.starts_with('/') {
            problems.push(
                join(path, "path"),
                format!(
                    "{:?} must be an absolute device path such as /dev/ttyUSB0",
                    self.path
                ),
            );
        }
        if let Some(b) = self.baud_rate
            && !BAUD_RATES.contains(&b)
        {
            problems.push(
                join(path, "baud_rate"),
                format!("{b} is not a standard rate; use one of {BAUD_RATES:?}"),
            );
        }
        if let Some(d) = self.data_bits
            && !(5..=8).contains(&d)
        {
            problems.push(join(path, "data_bits"), format!("{d} must be 5, 6, 7 or 8"));
        }
        if let Some(s) = self.stop_bits
            && !(1..=2).contains(&s)
        {
            problems.push(join(path, "stop_bits"), format!("{s} must be 1 or 2"));
        }
    }

    /// The device the path resolves to now (a `stat`, no open).
    pub fn identity(&self) -> std::io::Result<DeviceIdentity> {
        DeviceIdentity::of(&self.path)
    }

    /// Opens the port exclusively on the reactor.
    pub fn open(&self, defaults: LineSettings) -> Result<tokio_serial::SerialStream, SerialError> {
        let s = self.settings(defaults);
        let builder = tokio_serial::new(&self.path, s.baud_rate)
            .data_bits(match s.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .parity(match s.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Odd => tokio_serial::Parity::Odd,
                Parity::Even => tokio_serial::Parity::Even,
            })
            .stop_bits(if s.stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            })
            .flow_control(match s.flow_control {
                FlowControl::None => tokio_serial::FlowControl::None,
                FlowControl::Software => tokio_serial::FlowControl::Software,
                FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
            });
        let err = |reason: String| SerialError::Open {
            path: self.path.clone(),
            settings: s.to_string(),
            reason,
        };
        let mut port = builder
            .open_native_async()
            .map_err(|e| err(e.to_string()))?;
        // serialport opens exclusively by default; say so explicitly, the guarantee matters.
        port.set_exclusive(true).map_err(|e| err(e.to_string()))?;
        Ok(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_take_driver_defaults_and_validation_names_fields() {
        let mut c = SerialConfig::new("/dev/ttyUSB0");
        c.parity = Some(Parity::Odd);
        c.baud_rate = Some(4800);
        let s = c.settings(LineSettings::E71_9600);
        assert_eq!(s.to_string(), "4800 7O1");
        let bad = SerialConfig {
            path: "ttyUSB0".into(),
            baud_rate: Some(12345),
            data_bits: Some(9),
            parity: None,
            stop_bits: Some(3),
            flow_control: None,
        };
        let mut p = Problems::new();
        bad.validate("drivers[0].serial", &mut p);
        let text = p.to_string();
        for f in ["path", "baud_rate", "data_bits", "stop_bits"] {
            assert!(text.contains(&format!("drivers[0].serial.{f}:")), "{text}");
        }
    }

    #[tokio::test]
    async fn a_missing_port_is_an_operator_readable_error() {
        let e = SerialConfig::new("/dev/serial/by-id/does-not-exist")
            .open(LineSettings::N81_9600)
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/dev/serial/by-id/does-not-exist"), "{msg}");
        assert!(msg.contains("9600 8N1"), "{msg}");
    }
}
