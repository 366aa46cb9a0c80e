//! The BLE beacon family (cargo feature `ble`, on by default).
//!
//! Today it holds the simulated beacon sightings that the `simulated` driver generates
//! (`sightings_per_second`); the BlueZ, HCI-capture and remote-receiver sources of issue 9 belong
//! here too. A build without `ble` reports a config that asks for any of them as a config problem
//! (see [`crate::family`]).

pub mod presence;
pub mod presence_driver;
pub mod sim;
pub mod simulated;
