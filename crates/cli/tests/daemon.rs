//! `blksnapd` as a process: socket permissions, one daemon per socket, clean
//! stop on SIGTERM and SIGINT, configuration errors; and the Rust client
//! driving a full cycle with typed results and errno-carrying errors.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::{Duration, Instant};

use blksnap_client::{Client, SnapshotCreateArgs};
use common::{blksnapd_command, exists, Daemon};

/// `blksnapd` refused to run: status 1, and a message with every needle.
fn assert_refused(out: &Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(needles.iter().all(|n| stderr.contains(n)), "{stderr}");
}

#[test]
fn socket_is_private_and_single() {
    let mut d = Daemon::start();
    let mode = std::fs::metadata(&d.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let second = blksnapd_command(&d.control, &d.path("state2"))
        .output()
        .unwrap();
    assert_refused(&second, &["already serving", &d.pid().to_string()]);
    // the first daemon is unharmed
    assert_eq!(d.ok(&["version"]), "0.1.0\n");
    assert!(d.stop().success());
    assert!(!exists(&d.control), "socket left behind");
}

#[test]
fn stops_cleanly_on_sigterm_and_sigint_with_devices_attached() {
    let mut d = Daemon::start();
    d.image("a.img", 1 << 20);
    d.ok(&["attach", "--device", "a.img"]);
    let id = d.snapshot("a.img");
    // A client waiting for events (2 s) does not hold up the stop beyond
    // its request: the stop neither hangs nor runs into the 10 s drain
    // bound, and the request in flight gets its reply (no event: a
    // timeout).
    let mut waiter = Client::connect(&d.control).unwrap();
    let uuid: uuid::Uuid = id.parse().unwrap();
    let t = std::thread::spawn(move || waiter.snapshot_wait_event(uuid, Duration::from_secs(2)));
    // Handshake: the daemon has the request (logged as it is received).
    d.wait_log(&["SnapshotWaitevent", &id]);
    let started = Instant::now();
    assert!(d.stop().success());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(9),
        "the stop took {took:?}: held up by the waiting client"
    );
    assert_eq!(
        t.join()
            .unwrap()
            .expect("the request in flight got its reply"),
        None,
        "no event came within the wait"
    );
    assert!(d.log().contains("blksnapd stopped"));

    let mut d = Daemon::start();
    common::signal(d.pid(), "HUP");
    d.wait_log(&["SIGHUP ignored"]);
    assert!(d.running(), "SIGHUP stopped the daemon");
    assert_eq!(
        d.ok(&["version"]),
        "0.1.0\n",
        "SIGHUP must not stop the daemon"
    );
    common::signal(d.pid(), "INT");
    assert!(d.stop_or_status().success());
    assert!(d.log().contains("stopping"), "{}", d.log());
    assert!(!exists(&d.control), "socket left behind");
}

#[test]
fn config_file_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("blksnapd.toml");
    std::fs::write(
        &config,
        "chunk_minimum_shift = 18\ndiff_storage_minim = \"1G\"\n",
    )
    .unwrap();
    let out = blksnapd_command(&dir.path().join("c.sock"), &dir.path().join("state"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_refused(&out, &["diff_storage_minim", "blksnapd.toml"]);
    std::fs::write(
        &config,
        "tracking_block_minimum_shift = 12\ndiff_storage_minimum = \"64M\"\n",
    )
    .unwrap();
    let d = Daemon::start_with(&["--config", config.to_str().unwrap()]);
    d.image("a.img", 1 << 20);
    d.ok(&["attach", "--device", "a.img"]);
    assert!(d
        .ok(&["cbtinfo", "--device", "a.img"])
        .starts_with("block_size=4096\n"));
}

#[test]
fn rust_client_full_cycle() {
    let d = Daemon::start();
    let a = d.image("a.img", 4 << 20);
    let mut c = Client::connect(&d.control).unwrap();
    assert_eq!(c.version().unwrap().protocol, 1);
    let info = c.attach(a.to_str().unwrap(), Some("disk")).unwrap();
    assert_eq!((info.name.as_str(), info.size), ("disk", 4 << 20));
    let err = c.attach(a.to_str().unwrap(), None).unwrap_err();
    assert_eq!(err.errno(), 17);
    assert_eq!(c.cbtinfo("disk").unwrap().block_count, 64);
    c.mark_dirty("disk", &[blksnap_client::Range { start: 0, count: 1 }])
        .unwrap();
    let id = c
        .snapshot_create(SnapshotCreateArgs {
            storage: Some(d.dir.path().display().to_string()),
            limit: Some(1 << 30),
            devices: vec!["disk".into()],
            on_copy_error: None,
            copy_timeout_ms: None,
            storage_wait_ms: None,
            auto_destroy: false,
            overwrite: false,
        })
        .unwrap();
    c.snapshot_take(id).unwrap();
    assert_eq!(c.read_cbt_map("disk").unwrap()[..2], [1, 0]);
    let info = c.snapshot_info(id).unwrap();
    assert_eq!(info.images[0].error_code, 0);
    assert_eq!(
        c.snapshot_info_of_device("disk")
            .unwrap()
            .for_device
            .as_deref(),
        Some("disk")
    );
    assert_eq!(
        c.snapshot_wait_event(id, Duration::from_millis(10))
            .unwrap(),
        None
    );
    assert_eq!(c.detach("disk").unwrap_err().errno(), 16);
    c.snapshot_destroy(id).unwrap();
    assert_eq!(c.snapshot_destroy(id).unwrap_err().errno(), 2);
    c.detach("disk").unwrap();
    assert!(c.list().unwrap().devices.is_empty());
}

#[test]
fn nbd_over_tcp_is_loopback_only_unless_allowed() {
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&["--nbd-tcp", &addr]);
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut s, &mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    drop(d);

    let dir = tempfile::tempdir().unwrap();
    let out = blksnapd_command(&dir.path().join("c.sock"), &dir.path().join("state"))
        .args(["--nbd-tcp", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_refused(
        &out,
        &[
            "not a loopback address",
            "--nbd-tls require",
            "--nbd-insecure",
        ],
    );
    // TLS offered is not enough either: a client may stay in plain text.
    let pki = blksnap_test_support::pki::TestPki::generate(dir.path());
    let tls = [
        "--nbd-tls-cert",
        pki.server_cert.to_str().unwrap(),
        "--nbd-tls-key",
        pki.server_key.to_str().unwrap(),
    ];
    let out = blksnapd_command(&dir.path().join("c.sock"), &dir.path().join("state"))
        .args(["--nbd-tcp", "0.0.0.0:0", "--nbd-tls", "on"])
        .args(tls)
        .output()
        .unwrap();
    assert_refused(&out, &["not a loopback address"]);
    // Half the TLS files, or files with TLS off: named.
    let out = blksnapd_command(&dir.path().join("c.sock"), &dir.path().join("state"))
        .args(["--nbd-tls", "require", "--nbd-tls-cert"])
        .arg(&pki.server_cert)
        .output()
        .unwrap();
    assert_refused(&out, &["--nbd-tls-key"]);
    let out = blksnapd_command(&dir.path().join("c.sock"), &dir.path().join("state"))
        .args(["--nbd-tls", "off"])
        .args(tls)
        .output()
        .unwrap();
    assert_refused(&out, &["--nbd-tls off"]);
    // A key that is not the certificate's.
    let out = blksnapd_command(&dir.path().join("c.sock"), &dir.path().join("state"))
        .args(["--nbd-tls-cert"])
        .arg(&pki.server_cert)
        .arg("--nbd-tls-key")
        .arg(pki.client_dir.join("client-key.pem"))
        .output()
        .unwrap();
    assert_refused(&out, &["do not go together"]);
    // Required TLS (a certificate implies it), or --nbd-insecure: served.
    for extra in [&tls[..], &["--nbd-insecure"][..]] {
        let mut args = vec!["--nbd-tcp", "0.0.0.0:0"];
        args.extend_from_slice(extra);
        drop(Daemon::start_with(&args));
    }
}
