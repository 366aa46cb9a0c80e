//! The BLE beacon family (cargo feature `ble`, on by default).
//!
//! Today it holds the simulated beacon sightings that the `simulated` driver generates
//! (`sightings_per_second`), the presence engine ([`presence`], [`presence_driver`]), and the
//! byte-level parsing layer the beacon sources of issue 9 share (`docs/BLE.md`). The parsers do
//! no I/O beyond `std::io::Read`/`Write`:
//! * [`btsnoop`]: capture files (`btmon -w`, Android) read and written: records, HCI events,
//!   advertising reports;
//! * [`hci`]: HCI LE Advertising Reports, legacy and extended, to [`hci::AdvertisingReport`]s;
//! * [`ad`]: the AD structures of an advertisement (flags, names, service and manufacturer data);
//! * [`beacon`] and [`eddystone`]: iBeacon, AltBeacon and Eddystone UID/URL/TLM/EID frames.
//!
//! Each layer returns an error value for malformed input and never panics on it; the fuzz
//! targets of `drivers/fuzz/` (`ble_advertising`, `hci_event`, `btsnoop_capture`) check that.
//!
//! The `beacons` driver ([`beacons`]) turns a source into `beacon.sightings`: [`replay`] (btsnoop
//! and JSONL captures) and [`mqtt_source`] (remote receivers, [`receivers`]: our schema and
//! ESPresense), behind [`source::SightingSource`], with the allow-list of [`source`] applied at
//! ingest, and (feature `bluez`) `bluez`: this computer's adapter through bluetoothd on D-Bus.
//! A build without `ble` reports a config that asks for any of them as a config problem, and a
//! build with `ble` but without `bluez` does so for `kind = "bluez"` (see [`crate::family`]).

pub mod ad;
pub mod beacon;
pub mod beacons;
#[cfg(feature = "bluez")]
pub mod bluez;
pub mod btsnoop;
pub mod eddystone;
pub mod hci;
pub mod mqtt_source;
pub mod presence;
pub mod presence_driver;
pub mod receivers;
pub mod replay;
pub mod sim;
pub mod simulated;
pub mod source;
