//! Claims of docs/blksnapd.md and docs/protocol.md about the daemon as a
//! process that had no test: the limit of 128 control connections and its
//! `EAGAIN`; `blksnap shutdown` and `shutdown --force` (no loop devices
//! here: the busy case is in claims_local.rs); `control_group` (mode 0660,
//! the socket's group); a start over the socket and lock file a killed
//! daemon left behind; SIGTERM during start-up; `attach_loop = true`
//! without `--fuse-dir`; reserved device names; the systemd readiness
//! notification after the recorded devices are back; SIGTERM with stderr
//! gone. No root needed (image files, sockets in the
//! test's temporary directory).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blksnap_test_support::is_root;
use common::{blksnapd_command, exists, wait_until, Daemon};

const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\n");

/// A control connection that has been served one `version` request (so
/// the daemon runs a connection thread for it).
fn served_connection(d: &Daemon) -> BufReader<UnixStream> {
    let mut stream = UnixStream::connect(&d.control).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"{\"command\":\"version\"}\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["ok"], true, "{line}");
    reader
}

#[test]
fn control_connections_over_128_get_eagain() {
    let d = Daemon::start();
    let mut held: Vec<_> = (0..128).map(|_| served_connection(&d)).collect();

    // The 129th: one error reply, unasked and without an id, then closed.
    let mut extra = UnixStream::connect(&d.control).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = String::new();
    extra.read_to_string(&mut text).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one reply, then end of stream: {text:?}");
    let reply: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply.get("id").is_none_or(|id| id.is_null()), "{reply}");
    assert_eq!(reply["error"]["errno"], 11, "{reply}");
    assert_eq!(reply["error"]["name"], "EAGAIN", "{reply}");
    assert_eq!(
        reply["error"]["message"], "too many control connections (maximum 128)",
        "{reply}"
    );

    // The 128 are still served.
    for reader in held.iter_mut().take(3) {
        reader
            .get_mut()
            .write_all(b"{\"command\":\"version\"}\n")
            .unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":true"), "{line}");
    }
    // One hangs up: its place is free again once its thread ends.
    held.pop();
    assert!(
        wait_until(Duration::from_secs(10), || d
            .cli(&["version"])
            .status
            .success()),
        "no client served after one of 128 left: {}",
        d.log()
    );
    assert_eq!(d.ok(&["version"]), VERSION);
}

#[test]
fn shutdown_and_shutdown_force_stop_the_daemon() {
    let mut d = Daemon::start();
    assert_eq!(d.ok(&["shutdown"]), "");
    let status = d.stop_or_status();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("stop requested over the control socket") && log.contains("force=false"),
        "{log}"
    );
    assert!(log.contains("blksnapd stopped"), "{log}");
    assert!(!exists(&d.control), "control socket left behind");
    assert!(!exists(&d.lock_file()), "lock file left behind");

    let mut d = Daemon::start();
    d.image("a.img", 1 << 20);
    d.ok(&["attach", "--device", "a.img"]);
    d.snapshot("a.img");
    assert_eq!(d.ok(&["shutdown", "--force", "--json"]), "{}\n");
    let status = d.stop_or_status();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    let log = d.log();
    assert!(log.contains("force=true"), "{log}");
    assert!(log.contains("blksnapd stopped"), "{log}");
    assert!(!exists(&d.control), "control socket left behind");
}

/// This process's effective group id (`Gid:` of /proc/self/status).
fn egid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Gid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn control_group_gives_the_socket_mode_0660_and_the_group() {
    // Root may give the socket any group; others only one of their own.
    let gid = if is_root() { 4242 } else { egid() };
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("blksnapd.toml");
    std::fs::write(&config, format!("control_group = \"{gid}\"\n")).unwrap();
    let d = Daemon::start_with(&["--config", config.to_str().unwrap()]);
    let meta = std::fs::metadata(&d.control).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    assert_eq!(d.ok(&["version"]), VERSION);

    // A group that does not exist: the daemon does not start.
    std::fs::write(&config, "control_group = \"no-such-group-blksnap\"\n").unwrap();
    let out = blksnapd_command(
        &config_dir.path().join("c.sock"),
        &config_dir.path().join("state"),
    )
    .arg("--nbd-socket")
    .arg(config_dir.path().join("nbd.sock"))
    .arg("--config")
    .arg(&config)
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("control group \"no-such-group-blksnap\" does not exist"),
        "{stderr}"
    );
    assert!(!exists(&config_dir.path().join("c.sock")));
}

#[test]
fn start_over_what_a_killed_daemon_left_behind() {
    let mut d = Daemon::start();
    let (control, nbd, lock) = (d.control.clone(), d.nbd.clone(), d.lock_file());
    let killed = d.pid();
    let dir = d.kill();
    assert!(exists(&control), "a killed daemon leaves its socket");
    assert!(exists(&nbd), "a killed daemon leaves its NBD socket");
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        format!("{killed}\n")
    );
    assert!(
        UnixStream::connect(&control).is_err(),
        "stale socket answers"
    );

    let d = Daemon::start_in(dir, &[]);
    assert_eq!(d.control, control);
    assert_eq!(d.ok(&["version"]), VERSION);
    d.wait_log(&["removed a stale control socket"]);
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        format!("{}\n", d.pid())
    );
    // The NBD socket was replaced too: it greets.
    let mut s = UnixStream::connect(&nbd).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 16];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"NBDMAGICIHAVEOPT");
}

/// Whether process `pid` catches signal `signal` (`SigCgt` of its status).
fn catches(pid: u32, signal: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("SigCgt:"))?;
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// The state letter of thread `tid` of this process.
fn thread_state(tid: &str) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[test]
fn sigterm_during_start_up_is_a_clean_stop() {
    const SIGTERM: u32 = 15;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stderr.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo failed");
    // The daemon's stderr is a pipe kept full until the signal is sent: it
    // blocks at its first log line (`NBD server listening`, STARTUP step
    // 6), after its signal handlers are in (step 3) and before the control
    // socket exists (step 9).
    let (go, wait_go) = std::sync::mpsc::channel::<()>();
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut file = std::fs::File::open(&fifo).unwrap();
            wait_go.recv().unwrap();
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).unwrap();
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let filler = {
        let mut writer = writer.try_clone().unwrap();
        std::thread::spawn(move || {
            let me = std::fs::read_link("/proc/thread-self").unwrap();
            tid_tx
                .send(me.file_name().unwrap().to_string_lossy().into_owned())
                .unwrap();
            // More than any pipe holds (at most 1 MiB by default).
            let _ = writer.write_all(&[b'#'; 4 << 20]);
        })
    };
    let tid = tid_rx.recv().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || thread_state(&tid) == Some('S')),
        "the pipe does not fill"
    );
    let control = dir.path().join("run/control.sock");
    let mut child = blksnapd_command(&control, &dir.path().join("state"))
        .arg("--nbd-socket")
        .arg(dir.path().join("run/nbd.sock"))
        .env("BLKSNAP_LOG", "info")
        .stdin(Stdio::null())
        .stderr(writer)
        .spawn()
        .unwrap();
    let pid = child.id();
    let installed = wait_until(Duration::from_secs(10), || catches(pid, SIGTERM));
    if !installed {
        let _ = child.kill();
        let _ = child.wait();
        go.send(()).unwrap();
        panic!(
            "blksnapd never caught SIGTERM; its stderr:\n{}",
            reader.join().unwrap().trim_start_matches('#')
        );
    }
    common::signal(pid, "TERM");
    // Still in start-up when the signal came: no control socket yet (and
    // none can appear while its stderr is full).
    assert!(!exists(&control), "the control socket was there already");
    go.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("blksnapd did not stop after a SIGTERM during start-up");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    filler.join().unwrap();
    let log = reader.join().unwrap();
    let log = log.trim_start_matches('#');
    assert_eq!(status.code(), Some(0), "{log}");
    for line in [
        "NBD server listening",
        "blksnapd started",
        "stopping",
        "blksnapd stopped",
    ] {
        assert!(log.contains(line), "no {line:?} in:\n{log}");
    }
    assert!(!exists(&control), "control socket left behind");
    assert!(!exists(Path::new(&format!("{}.lock", control.display()))));
}

#[test]
fn attach_loop_without_fuse_dir_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("blksnapd.toml");
    std::fs::write(&config, "attach_loop = true\n").unwrap();
    let out = blksnapd_command(&dir.path().join("c.sock"), &dir.path().join("state"))
        .arg("--nbd-socket")
        .arg(dir.path().join("nbd.sock"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().last(),
        Some("blksnapd: attach_loop = true needs --fuse-dir"),
        "{stderr}"
    );
    assert!(!exists(&dir.path().join("c.sock")));
}

/// Device names that are directory entries where volumes show as files
/// (`snapshot`, `.`, `..`) are refused at the attach, with or without a
/// loop device: `EINVAL`. (docs/blksnapd.md says instead that such a
/// device is attached and only its loop device fails, with `EISDIR`.)
#[test]
fn reserved_device_names_are_refused() {
    let d = Daemon::start();
    d.image("a.img", 1 << 20);
    for name in ["snapshot", ".", ".."] {
        d.fails(
            &["attach", "--device", "a.img", "--name", name],
            &["EINVAL", &format!("device name \"{name}\" is reserved")],
        );
    }
    assert_eq!(
        d.ok(&["list", "--json"]),
        "{\"devices\":[],\"snapshots\":[]}\n"
    );
}

/// Under systemd (`Type=notify`), READY=1 comes once the recorded devices
/// are attached again and the control socket answers: units ordered after
/// blksnapd.service (mounts on our loop devices) find their devices.
#[test]
fn readiness_is_notified_after_recorded_devices_are_back() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let (control, state) = (dir.path().join("c.sock"), dir.path().join("state"));
    let image = dir.path().join("r.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    // A first daemon records the device and stops cleanly.
    let mut first = blksnapd_command(&control, &state).spawn().unwrap();
    assert!(wait_until(Duration::from_secs(10), || UnixStream::connect(
        &control
    )
    .is_ok()));
    let cli = |args: &[&str]| {
        let out = Command::new(common::blksnap())
            .args(args)
            .env("BLKSNAP_CONTROL", &control)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    cli(&["attach", "--device", image.to_str().unwrap()]);
    cli(&["shutdown"]);
    assert!(first.wait().unwrap().success());

    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut second = blksnapd_command(&control, &state)
        .env("NOTIFY_SOCKET", &notify)
        .spawn()
        .unwrap();
    let mut message = [0u8; 64];
    let n = listener.recv(&mut message).expect("no READY=1 within 20 s");
    assert_eq!(&message[..n], b"READY=1");
    // At that moment the device is back and the control socket answers.
    let list = cli(&["list"]);
    assert!(list.starts_with("device=r.img "), "{list}");
    cli(&["shutdown"]);
    assert!(second.wait().unwrap().success());
}

/// A snapshot created with `auto_destroy` lives as long as the control
/// connection that created it: a backup process that dies (its socket
/// closed by the kernel) leaves no snapshot behind. Others are untouched.
#[test]
fn auto_destroy_snapshots_go_with_their_connection() {
    let d = Daemon::start();
    d.image("a.img", 1 << 20);
    d.ok(&["attach", "--device", "a.img"]);
    let keep = d.create("a.img");
    d.ok(&["snapshot_destroy", "--id", &keep]);
    let mut conn = served_connection(&d);
    let storage = d.path("");
    let request = serde_json::json!({
        "id": 1,
        "command": "snapshot_create",
        "args": {"devices": ["a.img"], "storage": storage, "auto_destroy": true},
    });
    conn.get_mut()
        .write_all(format!("{request}\n").as_bytes())
        .unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["ok"], true, "{line}");
    let owned = reply["result"]["id"].as_str().unwrap().to_string();
    d.ok(&["snapshot_take", "--id", &owned]);
    // A plain snapshot of another device, made meanwhile, must survive.
    d.image("b.img", 1 << 20);
    d.ok(&["attach", "--device", "b.img"]);
    let plain = d.create("b.img");
    assert_eq!(
        d.ok(&["snapshot_collect"]).split_whitespace().count(),
        2,
        "both snapshots exist while the owner is connected"
    );
    drop(conn);
    assert!(
        wait_until(Duration::from_secs(10), || {
            d.ok(&["snapshot_collect"]).trim() == plain
        }),
        "the owned snapshot outlived its connection: {}",
        d.ok(&["snapshot_collect"])
    );
    assert!(
        d.log_lines(&["destroyed with the connection that owned it", &owned])
            .len()
            == 1
    );
}

/// SIGTERM stops the daemon though its stderr is gone (the reader of a
/// pipe exited, as when journald restarts): a log line that cannot be
/// written is lost, it does not kill the thread that handles signals.
#[test]
fn sigterm_stops_a_daemon_whose_stderr_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let mut child = blksnapd_command(&control, &dir.path().join("state"))
        .arg("--nbd-socket")
        .arg(dir.path().join("nbd.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("control socket ready") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "blksnapd ended before it was ready"
        );
    }
    drop(stderr);
    common::signal(child.id(), "TERM");
    let stopped = wait_until(Duration::from_secs(20), || {
        child.try_wait().unwrap().is_some()
    });
    if !stopped {
        let _ = child.kill();
    }
    assert!(
        stopped,
        "SIGTERM did not stop a daemon whose stderr is gone"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "blksnapd ended with {status}");
}
