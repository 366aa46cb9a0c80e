//! Device drivers (POS serial devices, BLE beacons, cameras). Filled by their issues.
