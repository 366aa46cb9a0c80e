//! The beacons driver with `source = { kind = "bluez" }` against python-dbusmock's `bluez5`
//! template on a private bus, so the real D-Bus code (bluer, libdbus) runs: the discovery filter
//! bluetoothd receives, our iBeacon becoming `beacon.sightings` records while a foreign one is
//! dropped and counted, no device address anywhere, and `down`/`up` in status when the adapter
//! is powered off, removed, and when bluetoothd itself goes away, each time coming back.
//!
//! libdbus reads the system bus address from `DBUS_SYSTEM_BUS_ADDRESS` when bluer connects. A
//! test cannot set the environment of its own process without `unsafe` (forbidden here), so
//! [`bluez_source_against_dbusmock`] starts a private `dbus-daemon`, then runs this test binary
//! again with the address set, for the one ignored test [`scenario`] that does the work.
//!
//! Needs `dbus-daemon` and python3 with `dbusmock` (scripts/install-deps.sh: `python3-dbusmock`).
//! Without them the test is skipped, except in CI (`CI=true`), where it fails.
#![cfg(feature = "bluez")]
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns
mod common;

use common::Harness;
use edge_core::State;
use edge_core::log::Log;
use edge_drivers::DriverConfig;
use edge_drivers::ble::source::parse_uuid;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const OURS: &str = "f7826da6-4fa2-4e98-8024-bc5b71e0893e";
const FOREIGN: &str = "e2c56db5-dffb-48d2-b060-d0f5a71096e0";
const OUR_ADDR: &str = "C0:FF:EE:00:00:01";
const FOREIGN_ADDR: &str = "C0:FF:EE:00:00:02";
/// Set (to the python interpreter with dbusmock) for the inner run of [`scenario`].
const INNER: &str = "EDGE_TEST_BLUEZ_PYTHON";

/// The mock's remote control: python-dbusmock's `org.bluez.Mock` methods (`AddAdapter`,
/// `AddDevice`, `RemoveAdapterWithDevices`), `org.freedesktop.DBus.Mock.UpdateProperties` and
/// `Properties.Set`, which emit `PropertiesChanged` as bluetoothd does when it hears an
/// advertisement.
const CONTROL: &str = r#"
import json, sys, time
import dbus
bus = dbus.SystemBus()
cmd, a = sys.argv[1], sys.argv[2:]
def obj(path):
    return bus.get_object('org.bluez', path)
def mock(path):
    return dbus.Interface(obj(path), 'org.freedesktop.DBus.Mock')
bluez = dbus.Interface(obj('/'), 'org.bluez.Mock')
def plain(v):
    if isinstance(v, dbus.Boolean):
        return bool(v)
    if isinstance(v, (dbus.Array, list)):
        return [plain(x) for x in v]
    if isinstance(v, (dbus.Dictionary, dict)):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, int):
        return int(v)
    return str(v)
if cmd == 'ping':
    dbus.Interface(obj('/'), 'org.freedesktop.DBus.ObjectManager').GetManagedObjects()
elif cmd == 'add_adapter':
    bluez.AddAdapter(a[0], 'edge-test')
elif cmd == 'remove_adapter':
    bluez.RemoveAdapterWithDevices(a[0])
elif cmd == 'add_device':
    bluez.AddDevice(a[0], a[1], 'tag')
elif cmd == 'power':
    mock('/org/bluez/' + a[0]).UpdateProperties('org.bluez.Adapter1', {'Powered': dbus.Boolean(a[1] == '1')})
elif cmd == 'adapter':
    p = dbus.Interface(obj('/org/bluez/' + a[0]), 'org.freedesktop.DBus.Properties')
    print(json.dumps(plain(p.GetAll('org.bluez.Adapter1'))))
elif cmd == 'advertise':
    # adapter rounds interval_ms, then groups of: address company_hex data_hex rssi
    adapter, rounds, interval, groups = a[0], int(a[1]), int(a[2]), a[3:]
    for i in range(rounds):
        for j in range(0, len(groups), 4):
            addr, company, data, rssi = groups[j:j + 4]
            path = '/org/bluez/%s/dev_%s' % (adapter, addr.replace(':', '_').upper())
            # The RSSI first, then the data (dbusmock's UpdateProperties cannot carry a
            # dictionary; Properties.Set stores it and emits PropertiesChanged).
            mock(path).UpdateProperties('org.bluez.Device1', {'RSSI': dbus.Int16(int(rssi) - i % 3)})
            dbus.Interface(obj(path), 'org.freedesktop.DBus.Properties').Set(
                'org.bluez.Device1', 'ManufacturerData', dbus.Dictionary(
                    {dbus.UInt16(int(company, 16)): dbus.Array(bytes.fromhex(data), signature='y')},
                    signature='qv', variant_level=1))
        time.sleep(interval / 1000)
else:
    sys.exit('unknown command ' + cmd)
"#;

/// A python interpreter that has dbusmock (the Debian package installs it for /usr/bin/python3,
/// which a pyenv or venv `python3` on PATH may not see).
fn python_with_dbusmock() -> Option<String> {
    ["/usr/bin/python3", "python3"].into_iter().find_map(|p| {
        Command::new(p)
            .args(["-c", "import dbus, dbusmock"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success())
            .map(|_| p.to_string())
    })
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bluez_source_against_dbusmock() {
    let python = python_with_dbusmock();
    let daemon = Command::new("dbus-daemon").arg("--version").output().ok();
    let (Some(python), Some(_)) = (python, daemon) else {
        let why = "dbus-daemon or python3 with dbusmock is missing (scripts/install-deps.sh installs python3-dbusmock)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("skipped: {why}");
        return;
    };
    // A private bus with the session bus's permissive policy plays the system bus.
    let mut child = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--nopidfile", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("dbus-daemon starts");
    let mut address = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut address)
        .expect("dbus-daemon prints its address");
    let _daemon = Killed(child);
    let address = address.trim().to_string();
    assert!(address.starts_with("unix:"), "{address:?}");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "scenario", "--ignored", "--nocapture"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
        .env(INNER, &python)
        .output()
        .expect("the test binary runs again");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the scenario failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the scenario did not run:\n{text}"
    );
}

/// Runs the control script against the private bus; its stdout.
fn control(python: &str, args: &[&str]) -> String {
    let out = Command::new(python)
        .arg("-c")
        .arg(CONTROL)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn control_async(python: &str, args: &[&str]) -> String {
    let python = python.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        control(&python, &args)
    })
    .await
    .unwrap()
}

/// The mock bluetoothd, on the bus of `DBUS_SYSTEM_BUS_ADDRESS`, ready when it answers.
async fn start_mock(python: &str) -> Killed {
    let child = Command::new(python)
        .args(["-m", "dbusmock", "--system", "--template", "bluez5"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("dbusmock starts");
    let mock = Killed(child);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let ok = Command::new(python)
            .arg("-c")
            .arg(CONTROL)
            .arg("ping")
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return mock;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dbusmock did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The manufacturer data an iBeacon sends after Apple's company id 0x004C, as hex.
fn ibeacon_data(uuid: &str, major: u16, minor: u16) -> String {
    let mut d = vec![0x02, 0x15];
    d.extend(parse_uuid(uuid).unwrap());
    d.extend(major.to_be_bytes());
    d.extend(minor.to_be_bytes());
    d.push(-59i8 as u8);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Both devices advertise `rounds` times, 20 ms apart.
async fn advertise(python: &str, rounds: u32) {
    let (ours, foreign) = (ibeacon_data(OURS, 1, 17), ibeacon_data(FOREIGN, 3, 3));
    let rounds = rounds.to_string();
    control_async(
        python,
        &[
            "advertise",
            "hci0",
            &rounds,
            "20",
            OUR_ADDR,
            "004c",
            &ours,
            "-60",
            FOREIGN_ADDR,
            "004c",
            &foreign,
            "-55",
        ],
    )
    .await;
}

async fn add_devices(python: &str) {
    for addr in [OUR_ADDR, FOREIGN_ADDR] {
        control_async(python, &["add_device", "hci0", addr]).await;
    }
}

fn dropped(h: &Harness, reason: &str) -> u64 {
    h.status
        .get("aisle-1")
        .and_then(|s| s.fields.get("dropped").cloned())
        .and_then(|d| d[reason].as_u64())
        .unwrap_or(0)
}

/// Waits for records on top of `have`, advertising meanwhile (the driver may still be
/// re-subscribing after a return).
async fn heard_again(h: &Harness, python: &str, have: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        advertise(python, 5).await;
        let n = h.log.next_seq("beacon.sightings").unwrap_or(1) - 1;
        if n > have {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new sightings; status: {:?}",
            h.status.get("aisle-1")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by bluez_source_against_dbusmock with a private system bus"]
async fn scenario() {
    let Ok(python) = std::env::var(INNER) else {
        eprintln!("run by bluez_source_against_dbusmock, which sets up the bus");
        return;
    };
    let h = Harness::new();
    let mut mock = start_mock(&python).await;
    control_async(&python, &["add_adapter", "hci0"]).await;
    let config = format!(
        r#"
[[drivers]]
type = "beacons"
name = "aisle-1"
window_ms = 200
[drivers.allow]
ibeacon_uuids = ["{OURS}"]
[drivers.source]
kind = "bluez"
"#
    );
    #[derive(serde::Deserialize)]
    struct Doc {
        drivers: Vec<DriverConfig>,
    }
    let doc: Doc = toml::from_str(&config).unwrap();
    let mut p = edge_core::config::Problems::new();
    edge_drivers::validate_drivers(&doc.drivers, "drivers", &mut p);
    assert!(p.is_empty(), "{p}");
    let driver = tokio::spawn(doc.drivers[0].build(h.ctx("aisle-1", "beacons")).unwrap());

    // Up on the default adapter, with the filter bluetoothd was given.
    h.wait_status("aisle-1", T, |s| {
        s.state == State::Up && s.fields.get("adapter") == Some(&Value::from("hci0"))
    })
    .await;
    let adapter: Value =
        serde_json::from_str(&control_async(&python, &["adapter", "hci0"]).await).unwrap();
    assert_eq!(adapter["Discovering"], true, "{adapter}");
    let filter = &adapter["DiscoveryFilter"];
    assert_eq!(filter["Transport"], "le", "{adapter}");
    assert_eq!(filter["DuplicateData"], true, "{adapter}");
    assert_eq!(filter["RSSI"], -100, "{adapter}");

    // Ours becomes records; the foreign one is dropped and counted.
    add_devices(&python).await;
    advertise(&python, 10).await;
    h.wait_for("beacon.sightings", 1, T).await;
    let deadline = tokio::time::Instant::now() + T;
    while dropped(&h, "not_allowed") < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            h.status.get("aisle-1")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tag = format!("ibeacon:{OURS}:1:17");
    let first = h.payloads("beacon.sightings").await;
    for s in &first {
        assert_eq!(s["beacon"], tag, "{s}");
        assert_eq!(s["receiver"], "aisle-1", "{s}");
        let rssi = s["rssi"].as_i64().unwrap();
        assert!((-62..=-60).contains(&rssi), "{s}");
        assert_eq!(s["tx_power"], -59, "{s}");
    }
    let mut have = first.len() as u64;

    // Powered off: down with the reason; powered on: up, and heard again.
    control_async(&python, &["power", "hci0", "0"]).await;
    h.wait_status("aisle-1", T, |s| {
        s.state == State::Down
            && s.detail.contains("powered off")
            && s.fields.get("powered") == Some(&Value::Bool(false))
    })
    .await;
    control_async(&python, &["power", "hci0", "1"]).await;
    h.wait_status("aisle-1", T, |s| {
        s.state == State::Up && s.fields.get("powered") == Some(&Value::Bool(true))
    })
    .await;
    have = heard_again(&h, &python, have).await;

    // The adapter removed (unplugged): down; back: up, and heard again.
    control_async(&python, &["remove_adapter", "hci0"]).await;
    h.wait_status("aisle-1", T, |s| {
        // The first reason, or the next attempt's (the default adapter: there is none).
        s.state == State::Down
            && (s.detail.contains("hci0 is gone") || s.detail.contains("no Bluetooth adapter"))
    })
    .await;
    control_async(&python, &["add_adapter", "hci0"]).await;
    h.wait_status("aisle-1", T, |s| s.state == State::Up).await;
    add_devices(&python).await;
    have = heard_again(&h, &python, have).await;

    // bluetoothd gone (no signal at all: the probe finds it): down; restarted: up again.
    drop(mock);
    h.wait_status("aisle-1", T, |s| {
        s.state == State::Down && s.detail.contains("bluetoothd")
    })
    .await;
    mock = start_mock(&python).await;
    control_async(&python, &["add_adapter", "hci0"]).await;
    h.wait_status("aisle-1", T, |s| s.state == State::Up).await;
    add_devices(&python).await;
    heard_again(&h, &python, have).await;

    // Only ours, and no address in any record or in status.
    for s in h.payloads("beacon.sightings").await {
        assert_eq!(s["beacon"], tag, "{s}");
    }
    let status = serde_json::to_string(&h.status.snapshot())
        .unwrap()
        .to_lowercase();
    for r in h.records("beacon.sightings").await {
        let text = String::from_utf8_lossy(&r.event.payload).to_lowercase();
        for t in [&text, &status] {
            assert!(
                !t.contains("c0:ff:ee") && !t.contains("c0_ff_ee") && !t.contains(FOREIGN),
                "{t}"
            );
        }
    }
    h.shutdown.stop_all();
    tokio::time::timeout(T, driver)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(mock);
}
