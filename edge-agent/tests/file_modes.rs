//! `log export --output` files are 0600 whatever the process umask. Its own test binary, because
//! the umask is per process and the test sets it to 0.
#![allow(clippy::unwrap_used)]

use edge_agent::cli::{EXPORT_FILE_MODE, create_export_file};
use nix::sys::stat::{Mode, umask};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

#[test]
fn export_files_are_private_under_a_umask_of_zero() {
    umask(Mode::empty());
    let dir = tempfile::tempdir().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let probe = dir.path().join("probe");
    std::fs::write(&probe, b"").unwrap();
    assert_eq!(mode(&probe), 0o666, "the umask is 0, so the check can fail");

    let out = dir.path().join("export.jsonl");
    create_export_file(&out)
        .unwrap()
        .write_all(b"{}\n")
        .unwrap();
    assert_eq!(mode(&out), EXPORT_FILE_MODE);
    assert_eq!(EXPORT_FILE_MODE, 0o600);
    // An existing file that is replaced becomes private too, and is truncated.
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    create_export_file(&out).unwrap();
    assert_eq!(mode(&out), 0o600);
    assert_eq!(std::fs::read(&out).unwrap(), b"");
}
