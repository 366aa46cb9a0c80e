//! `source = { kind = "bluez", ... }` (cargo feature `bluez`): this computer's own Bluetooth
//! adapter, through bluetoothd on the system D-Bus with `bluer`.
//!
//! * **Discovery** is LE only, with an explicit filter: `Transport = le`, `DuplicateData` on (so
//!   bluetoothd reports every advertisement, not only changed ones) and `RSSI` at `rssi_floor`.
//!   The driver's own `rssi_floor` still applies after the receiver's offset.
//! * **What is heard**: bluetoothd hands over parsed properties, not the advertisement, so each
//!   device's `ManufacturerData` (company id -> bytes) and `ServiceData` (UUID -> bytes) are
//!   encoded back into AD structures ([`advertising_data`]) and go through the same
//!   [`super::source::identify`] and allow-list as every other source. A device is a sighting
//!   when it appears and whenever its `RSSI`, `ManufacturerData` or `ServiceData` changes; the
//!   changes of one advertisement (one `PropertiesChanged` signal) make one sighting.
//! * **Privacy**: a device address is only a key of the in-memory table of devices being heard
//!   (at most [`MAX_DEVICES`]; more are counted as `over_cap`); it is never in a sighting, a
//!   status detail or a log line. Errors about one device are not reported at all, since
//!   bluetoothd's messages name the device's object path, which holds the address.
//! * **Faults**: the adapter powered off, the adapter gone (unplugged) and bluetoothd or the
//!   system bus gone set the status `down` with the reason and are retried with [`Backoff`]; the
//!   source is `up` again (fields `adapter`, `powered`) when discovery runs. A probe of the
//!   adapter's `Powered` property every [`PROBE`] finds losses that send no signal (bluetoothd
//!   killed).
//!
//! The D-Bus work runs on its own task and hands batches over a small bounded channel, so
//! [`SightingSource::next`] is cancel-safe (the beacons driver selects on it with a timer); a
//! full channel makes the task wait, and bluetoothd's signals queue on the D-Bus connection.

use super::ad::{ad_type, push_structure};
use super::receivers::valid_id;
use super::source::{Drop, Drops, Heard, RawSighting, SightingSource};
use bluer::{
    Adapter, AdapterEvent, AdapterProperty, Address, DeviceEvent, DeviceProperty, DiscoveryFilter,
    DiscoveryTransport, Session, Uuid,
};
use edge_core::State;
use edge_core::backoff::{Backoff, Jitter};
use edge_core::status::StatusHandle;
use futures::stream::{AbortHandle, BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use tokio::sync::mpsc;

/// Devices heard at once; more are not followed (counted as `over_cap`).
pub const MAX_DEVICES: usize = 4_096;
/// How often the adapter's `Powered` property is read to find losses that send no signal.
pub const PROBE: Duration = Duration::from_secs(2);
/// Ready events handled before a batch is handed over.
const DRAIN: usize = 512;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BluezConfig {
    /// The adapter (`hci0`); default: bluetoothd's default adapter (`hci0` if present, else the
    /// first by name).
    #[serde(default)]
    pub adapter: Option<String>,
    /// The receiver id of the sightings; default: the driver's name.
    #[serde(default)]
    pub receiver: Option<String>,
    /// The discovery filter's RSSI threshold, dBm: bluetoothd reports nothing weaker.
    #[serde(default = "default_floor")]
    pub rssi_floor: Option<i16>,
    /// The discovery filter's `DuplicateData`: report every advertisement (on), or only changes.
    #[serde(default = "default_duplicate_data")]
    pub duplicate_data: bool,
}

fn default_floor() -> Option<i16> {
    Some(-100)
}

fn default_duplicate_data() -> bool {
    true
}

impl Default for BluezConfig {
    fn default() -> Self {
        BluezConfig {
            adapter: None,
            receiver: None,
            rssi_floor: default_floor(),
            duplicate_data: true,
        }
    }
}

/// An adapter name as bluetoothd names them (one D-Bus object path element).
fn valid_adapter(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl BluezConfig {
    /// Every problem, as (field, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if let Some(a) = &self.adapter
            && !valid_adapter(a)
        {
            p.push((
                "adapter".into(),
                format!("{a:?} is not an adapter name (like \"hci0\": 1-32 of A-Z a-z 0-9 _)"),
            ));
        }
        if let Some(r) = &self.receiver
            && !valid_id(r)
        {
            p.push((
                "receiver".into(),
                "must be 1-64 of A-Z a-z 0-9 . _ -".into(),
            ));
        }
        if let Some(f) = self.rssi_floor
            && !(-127..=20).contains(&f)
        {
            p.push((
                "rssi_floor".into(),
                "must be -127 to 20 dBm (bluetoothd's range)".into(),
            ));
        }
        p
    }

    /// The receiver id the sightings carry.
    pub fn receiver_id(&self, driver: &str) -> String {
        self.receiver.clone().unwrap_or_else(|| driver.to_string())
    }

    fn filter(&self) -> DiscoveryFilter {
        DiscoveryFilter {
            transport: DiscoveryTransport::Le,
            duplicate_data: self.duplicate_data,
            rssi: self.rssi_floor,
            ..Default::default()
        }
    }
}

/// The 16- and 32-bit UUIDs are shortened forms of `xxxxxxxx-0000-1000-8000-00805f9b34fb`.
const BASE_UUID_TAIL: [u8; 12] = [
    0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0x80, 0x5f, 0x9b, 0x34, 0xfb,
];

/// The AD structures of an advertisement, rebuilt from bluetoothd's `ManufacturerData` and
/// `ServiceData`: manufacturer data as type 0xFF with the company id little-endian first;
/// service data as 0x16 (16-bit UUID), 0x20 (32-bit) or 0x21 (128-bit), the UUID little-endian
/// first. A value too long for one structure (over 252 bytes) is left out.
pub fn advertising_data(
    manufacturer: &BTreeMap<u16, Vec<u8>>,
    service: &BTreeMap<Uuid, Vec<u8>>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for (company, bytes) in manufacturer {
        let mut d = company.to_le_bytes().to_vec();
        d.extend_from_slice(bytes);
        // Too long for AD: left out, and then counted as no beacon or malformed.
        let _ = push_structure(&mut out, ad_type::MANUFACTURER, &d);
    }
    for (uuid, bytes) in service {
        let b = uuid.as_bytes();
        let (t, mut d) = if b[4..] == BASE_UUID_TAIL && b[..2] == [0, 0] {
            (ad_type::SERVICE_DATA_16, vec![b[3], b[2]])
        } else if b[4..] == BASE_UUID_TAIL {
            (ad_type::SERVICE_DATA_32, vec![b[3], b[2], b[1], b[0]])
        } else {
            (ad_type::SERVICE_DATA_128, b.iter().rev().copied().collect())
        };
        d.extend_from_slice(bytes);
        let _ = push_structure(&mut out, t, &d);
    }
    out
}

/// What the source hands the driver: sightings and the devices it could not follow.
#[derive(Debug, Default)]
struct Batch {
    sightings: Vec<RawSighting>,
    over_cap: u64,
}

/// The running BlueZ source: a task that owns the D-Bus session (started on the first
/// [`SightingSource::next`], which has the status handle) and the channel it fills.
pub struct BluezSource {
    cfg: BluezConfig,
    receiver: String,
    rx: Option<mpsc::Receiver<Batch>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for BluezSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BluezSource")
            .field("adapter", &self.cfg.adapter)
            .field("receiver", &self.receiver)
            .finish()
    }
}

impl BluezSource {
    pub fn new(cfg: &BluezConfig, driver: &str) -> BluezSource {
        BluezSource {
            cfg: cfg.clone(),
            receiver: cfg.receiver_id(driver),
            rx: None,
            task: None,
        }
    }
}

impl std::ops::Drop for BluezSource {
    fn drop(&mut self) {
        // Dropping the session stops discovery (bluer sends StopDiscovery).
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl SightingSource for BluezSource {
    async fn next(&mut self, status: &StatusHandle, drops: &mut Drops) -> Option<Vec<RawSighting>> {
        if self.task.is_none() {
            let (tx, rx) = mpsc::channel(8);
            let cfg = self.cfg.clone();
            let receiver = self.receiver.clone();
            let status = status.clone();
            self.task = Some(tokio::spawn(run(cfg, receiver, status, tx)));
            self.rx = Some(rx);
        }
        // The task runs until the source is dropped; `None` only if it panicked.
        let b = self.rx.as_mut()?.recv().await?;
        if b.over_cap > 0 {
            drops.add(Drop::OverCap, b.over_cap);
        }
        Some(b.sightings)
    }
}

/// Why discovery is not running, for status.
#[derive(Debug, Clone, PartialEq)]
struct Down {
    reason: String,
    powered: Option<bool>,
}

impl Down {
    fn new(reason: impl Into<String>, powered: Option<bool>) -> Down {
        Down {
            reason: reason.into(),
            powered,
        }
    }
}

/// Connects, discovers until the adapter or bluetoothd is lost, reports and backs off, for ever
/// (until the driver drops the channel).
async fn run(cfg: BluezConfig, receiver: String, status: StatusHandle, tx: mpsc::Sender<Batch>) {
    let mut backoff =
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30)).with_jitter(Jitter::Full);
    loop {
        let down = match Live::connect(&cfg).await {
            Ok(mut live) => {
                backoff.reset();
                status.set(
                    State::Up,
                    format!(
                        "discovering LE advertisements on adapter {} (RSSI floor {}, duplicate data {})",
                        live.name,
                        cfg.rssi_floor
                            .map_or("none".to_string(), |f| format!("{f} dBm")),
                        if cfg.duplicate_data { "on" } else { "off" }
                    ),
                );
                status.field("adapter", live.name.clone());
                status.field("powered", true);
                status.field("discovering", true);
                match live.discover(&receiver, &tx).await {
                    Some(d) => d,
                    None => return,
                }
            }
            Err(d) => d,
        };
        let delay = backoff.next_delay();
        // The detail names no delay, so that a long outage is one log line.
        status.set(
            State::Down,
            format!("{}; retrying with backoff", down.reason),
        );
        status.field("powered", down.powered);
        status.field("discovering", false);
        status.field("retry_in_ms", delay.as_millis() as u64);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tx.closed() => return,
        }
    }
}

/// What is known of one device being heard.
struct Seen {
    rssi: Option<i16>,
    manufacturer: BTreeMap<u16, Vec<u8>>,
    service: BTreeMap<Uuid, Vec<u8>>,
    events: AbortHandle,
}

/// A discovery session on one adapter.
struct Live {
    // Kept for the connection: dropping it closes the D-Bus connection.
    _session: Session,
    adapter: Adapter,
    name: String,
    discovery: BoxStream<'static, AdapterEvent>,
    devices: SelectAll<BoxStream<'static, (Address, DeviceEvent)>>,
    seen: HashMap<Address, Seen>,
    dirty: HashSet<Address>,
    over_cap: u64,
}

/// Why the adapter cannot be used, asked of bluetoothd.
async fn diagnose(session: &Session, name: &str) -> Down {
    match session.adapter_names().await {
        Err(e) => Down::new(
            format!(
                "bluetoothd does not answer on the system D-Bus ({e}); is bluetooth.service running?"
            ),
            None,
        ),
        Ok(names) if !names.iter().any(|n| n == name) => Down::new(
            format!(
                "adapter {name} is gone (unplugged, or switched off by rfkill); adapters present: {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ),
            None,
        ),
        Ok(_) => match session.adapter(name) {
            Ok(a) => match a.is_powered().await {
                Ok(false) => powered_off(name),
                Ok(true) => Down::new(format!("discovery on adapter {name} stopped"), Some(true)),
                Err(e) => Down::new(format!("adapter {name} does not answer: {e}"), None),
            },
            Err(e) => Down::new(format!("adapter {name}: {e}"), None),
        },
    }
}

fn powered_off(name: &str) -> Down {
    Down::new(
        format!("adapter {name} is powered off (`bluetoothctl power on` turns it on)"),
        Some(false),
    )
}

impl Live {
    async fn connect(cfg: &BluezConfig) -> Result<Live, Down> {
        let session = Session::new()
            .await
            .map_err(|e| Down::new(format!("cannot connect to the system D-Bus: {e}"), None))?;
        let adapter = match &cfg.adapter {
            Some(name) => session
                .adapter(name)
                .map_err(|e| Down::new(format!("adapter {name}: {e}"), None))?,
            None => match session.default_adapter().await {
                Ok(a) => a,
                Err(e) => {
                    return Err(match session.adapter_names().await {
                        Ok(names) if names.is_empty() => {
                            Down::new("bluetoothd has no Bluetooth adapter", None)
                        }
                        _ => Down::new(
                            format!(
                                "bluetoothd does not answer on the system D-Bus ({e}); is bluetooth.service running?"
                            ),
                            None,
                        ),
                    });
                }
            },
        };
        let name = adapter.name().to_string();
        match adapter.is_powered().await {
            Ok(true) => {}
            Ok(false) => return Err(powered_off(&name)),
            Err(_) => return Err(diagnose(&session, &name).await),
        }
        // Only fails while this session's discovery runs, and it does not yet.
        if let Err(e) = adapter.set_discovery_filter(cfg.filter()).await {
            return Err(Down::new(
                format!("setting the discovery filter on adapter {name}: {e}"),
                Some(true),
            ));
        }
        let discovery = match adapter.discover_devices().await {
            Ok(s) => s.boxed(),
            Err(e) => {
                let mut d = diagnose(&session, &name).await;
                if d.powered == Some(true) {
                    d.reason = format!("starting LE discovery on adapter {name} failed: {e}");
                }
                return Err(d);
            }
        };
        Ok(Live {
            _session: session,
            adapter,
            name,
            discovery,
            devices: SelectAll::new(),
            seen: HashMap::new(),
            dirty: HashSet::new(),
            over_cap: 0,
        })
    }

    /// Hands over sightings until the adapter or bluetoothd is lost (`Some(why)`) or the driver
    /// is gone (`None`).
    async fn discover(&mut self, receiver: &str, tx: &mpsc::Sender<Batch>) -> Option<Down> {
        let mut probe = tokio::time::interval(PROBE);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        loop {
            tokio::select! {
                ev = self.discovery.next() => {
                    if let Some(d) = self.adapter_event(ev).await {
                        return Some(d);
                    }
                }
                Some((addr, ev)) = self.devices.next(), if !self.devices.is_empty() => {
                    self.device_event(addr, ev);
                }
                _ = probe.tick() => {
                    match self.adapter.is_powered().await {
                        Ok(true) => {}
                        Ok(false) => return Some(powered_off(&self.name)),
                        Err(_) => return Some(diagnose(&self._session, &self.name).await),
                    }
                }
                _ = tx.closed() => return None,
            }
            // The rest of what is ready: the property changes of one signal arrive together.
            for _ in 0..DRAIN {
                if let Some(Some((addr, ev))) = self.devices.next().now_or_never() {
                    self.device_event(addr, ev);
                } else if let Some(ev) = self.discovery.next().now_or_never() {
                    if let Some(d) = self.adapter_event(ev).await {
                        return Some(d);
                    }
                } else {
                    break;
                }
            }
            let batch = self.take(receiver);
            if (!batch.sightings.is_empty() || batch.over_cap > 0) && tx.send(batch).await.is_err()
            {
                return None;
            }
        }
    }

    /// The sightings of the devices that changed, and the count of those not followed.
    fn take(&mut self, receiver: &str) -> Batch {
        let ts_ms = edge_core::time::now_ms();
        let mut batch = Batch {
            sightings: Vec::with_capacity(self.dirty.len()),
            over_cap: std::mem::take(&mut self.over_cap),
        };
        for addr in self.dirty.drain() {
            let Some(s) = self.seen.get(&addr) else {
                continue;
            };
            // A device bluetoothd remembers but does not hear now has no RSSI.
            let Some(rssi) = s.rssi else { continue };
            batch.sightings.push(RawSighting {
                receiver: receiver.to_string(),
                ts_ms,
                rssi,
                heard: Heard::Advertisement(advertising_data(&s.manufacturer, &s.service)),
            });
        }
        batch
    }

    /// Handles one adapter event; `Some(why)` when discovery has ended.
    async fn adapter_event(&mut self, ev: Option<AdapterEvent>) -> Option<Down> {
        match ev {
            Some(AdapterEvent::DeviceAdded(addr)) => {
                self.added(addr).await;
                None
            }
            Some(AdapterEvent::DeviceRemoved(addr)) => {
                if let Some(s) = self.seen.remove(&addr) {
                    s.events.abort();
                }
                self.dirty.remove(&addr);
                None
            }
            Some(AdapterEvent::PropertyChanged(AdapterProperty::Powered(false))) => {
                Some(powered_off(&self.name))
            }
            Some(_) => None,
            // The stream ends when discovery stops or the adapter is removed.
            None => Some(diagnose(&self._session, &self.name).await),
        }
    }

    /// Follows a device that appeared (or appeared again): subscribes to its property changes
    /// first, then reads the properties, so that no change falls in between.
    async fn added(&mut self, addr: Address) {
        let Ok(device) = self.adapter.device(addr) else {
            return;
        };
        if !self.seen.contains_key(&addr) {
            if self.seen.len() >= MAX_DEVICES {
                self.over_cap += 1;
                return;
            }
            // Errors about one device name its path (its address): not reported.
            let Ok(events) = device.events().await else {
                return;
            };
            let (events, handle) = futures::stream::abortable(events);
            self.devices.push(events.map(move |e| (addr, e)).boxed());
            self.seen.insert(
                addr,
                Seen {
                    rssi: None,
                    manufacturer: BTreeMap::new(),
                    service: BTreeMap::new(),
                    events: handle,
                },
            );
        }
        let rssi = device.rssi().await.ok().flatten();
        let manufacturer = device.manufacturer_data().await.ok().flatten();
        let service = device.service_data().await.ok().flatten();
        if let Some(s) = self.seen.get_mut(&addr) {
            s.rssi = rssi;
            if let Some(m) = manufacturer {
                s.manufacturer = m.into_iter().collect();
            }
            if let Some(d) = service {
                s.service = d.into_iter().collect();
            }
            if s.rssi.is_some() {
                self.dirty.insert(addr);
            }
        }
    }

    fn device_event(&mut self, addr: Address, DeviceEvent::PropertyChanged(p): DeviceEvent) {
        let Some(s) = self.seen.get_mut(&addr) else {
            return;
        };
        match p {
            DeviceProperty::Rssi(r) => s.rssi = Some(r),
            DeviceProperty::ManufacturerData(m) => s.manufacturer = m.into_iter().collect(),
            DeviceProperty::ServiceData(d) => s.service = d.into_iter().collect(),
            _ => return,
        }
        self.dirty.insert(addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ble::ad::Advertisement;
    use crate::ble::beacon::{Beacon, IBeacon};
    use crate::ble::eddystone::Eddystone;
    use crate::ble::source::{AllowList, BeaconId, identify, parse_uuid};

    const UUID: &str = "f7826da6-4fa2-4e98-8024-bc5b71e0893e";

    #[test]
    fn manufacturer_data_of_apple_is_rebuilt_into_the_ibeacon_the_allow_list_keeps() {
        // What the iBeacon's AD structure carries after the company id 0x004C.
        let full = Beacon::IBeacon(IBeacon {
            uuid: parse_uuid(UUID).unwrap(),
            major: 7,
            minor: 42,
            measured_power: -59,
        })
        .to_advertising_data()
        .unwrap();
        let adv = Advertisement::parse(&full).unwrap();
        let ours = adv
            .fields
            .iter()
            .find_map(|f| match f {
                crate::ble::ad::AdField::Manufacturer { company_id, data } => {
                    assert_eq!(*company_id, 0x004c);
                    Some(data.to_vec())
                }
                _ => None,
            })
            .expect("manufacturer data");
        let rebuilt = advertising_data(&BTreeMap::from([(0x004c, ours)]), &BTreeMap::new());
        let allowed = AllowList {
            ibeacon_uuids: vec![UUID.into()],
            ..Default::default()
        }
        .compile();
        let (id, tx) = identify(&Heard::Advertisement(rebuilt), &allowed).unwrap();
        assert_eq!(
            id,
            BeaconId::IBeacon {
                uuid: parse_uuid(UUID).unwrap(),
                major: 7,
                minor: 42
            }
        );
        assert_eq!(tx, Some(-59));
    }

    #[test]
    fn service_data_uuids_become_16_32_and_128_bit_structures() {
        let eddystone = Uuid::parse_str("0000feaa-0000-1000-8000-00805f9b34fb").unwrap();
        let u32 = Uuid::parse_str("12345678-0000-1000-8000-00805f9b34fb").unwrap();
        let u128 = Uuid::parse_str(UUID).unwrap();
        // An Eddystone-UID frame: type 0x00, ranging power, namespace, instance, two reserved.
        let mut uid = vec![0x00, 0xee];
        uid.extend(0u8..10);
        uid.extend([1, 2, 3, 4, 5, 6, 0, 0]);
        let ad = advertising_data(
            &BTreeMap::new(),
            &BTreeMap::from([(eddystone, uid.clone()), (u32, vec![9]), (u128, vec![8])]),
        );
        let mut want = vec![3 + uid.len() as u8, 0x16, 0xaa, 0xfe];
        want.extend(&uid);
        want.extend([6, 0x20, 0x78, 0x56, 0x34, 0x12, 9]);
        want.extend([18, 0x21]);
        want.extend(parse_uuid(UUID).unwrap().iter().rev());
        want.push(8);
        // BTreeMap order is by UUID value: 0000feaa < 12345678 < f7826da6.
        assert_eq!(ad, want, "{ad:02x?}");
        let adv = Advertisement::parse(&ad).unwrap();
        let beacons: Vec<_> = adv.beacons().collect();
        assert!(
            matches!(
                beacons.first(),
                Some(Ok(Beacon::Eddystone(Eddystone::Uid { instance, .. }))) if *instance == [1, 2, 3, 4, 5, 6]
            ),
            "{beacons:?}"
        );
        // Too long for one AD structure: left out, nothing else is lost.
        let long = advertising_data(
            &BTreeMap::from([(1, vec![0; 253]), (2, vec![7])]),
            &BTreeMap::new(),
        );
        assert_eq!(long, vec![4, 0xff, 2, 0, 7]);
    }

    #[test]
    fn config_defaults_and_every_problem_with_its_field() {
        let c: BluezConfig = toml::from_str("").unwrap();
        assert_eq!(c, BluezConfig::default());
        assert_eq!(c.rssi_floor, Some(-100));
        assert!(c.duplicate_data);
        assert_eq!(c.receiver_id("aisle-1"), "aisle-1");
        let f = c.filter();
        assert_eq!(
            (f.transport, f.duplicate_data, f.rssi),
            (DiscoveryTransport::Le, true, Some(-100))
        );
        let bad: BluezConfig =
            toml::from_str("adapter = \"hci0/x\"\nreceiver = \"\"\nrssi_floor = -200\n").unwrap();
        let fields: Vec<_> = bad.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["adapter", "receiver", "rssi_floor"]);
        assert!(toml::from_str::<BluezConfig>("adaptor = \"hci0\"").is_err());
    }
}
