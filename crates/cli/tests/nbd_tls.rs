//! Issue 13, item 1: NBD over TLS with the stock clients, through a real
//! blksnapd serving TCP with `--nbd-tls require` and a client CA:
//! qemu-io, qemu-img (`--object tls-creds-x509`), nbdinfo and nbdcopy
//! (`nbds://` URIs with `tls-certificates=`). A client without a
//! certificate from the CA, or in plain text, is refused; the daemon
//! serves on. Certificates come from a throw-away CA (openssl).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use blksnap_test_support::pki::TestPki;
use common::nbd_tools::{have, random_device, run};
use common::Daemon;

const MIB: u64 = 1 << 20;

struct TlsDaemon {
    d: Daemon,
    pki: TestPki,
    port: u16,
}

impl TlsDaemon {
    /// A daemon serving NBD on a free loopback port with TLS required and
    /// clients checked against the test CA, with one 4 MiB random device
    /// `a.img` attached; returns it and the device's content.
    fn start() -> (TlsDaemon, Vec<u8>) {
        let port = common::free_port();
        let pki_dir = tempfile::tempdir().unwrap();
        let pki = TestPki::generate(pki_dir.path());
        let mut options = vec!["--nbd-tcp".to_string(), format!("127.0.0.1:{port}")];
        options.extend(pki.server_options());
        let d = Daemon::start_with(&options.iter().map(String::as_str).collect::<Vec<_>>());
        // The PKI lives as long as the daemon's directory.
        std::mem::forget(pki_dir);
        let content = random_device(&d, "a.img", 4 * MIB, 7);
        (TlsDaemon { d, pki, port }, content)
    }

    /// qemu's `--object` and `--image-opts` for export `a.img` with the
    /// client credentials in `dir`.
    fn qemu_args(&self, dir: &Path) -> [String; 4] {
        [
            "--object".into(),
            format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display()),
            "--image-opts".into(),
            format!(
                "driver=nbd,server.type=inet,server.host=localhost,server.port={},export=a.img,tls-creds=tls0",
                self.port
            ),
        ]
    }

    /// The libnbd URI of `a.img` with the client credentials in `dir`.
    fn nbds_uri(&self, dir: &Path) -> String {
        format!(
            "nbds://localhost:{}/a.img?tls-certificates={}",
            self.port,
            dir.display()
        )
    }
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "a refused client succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn qemu_io_and_qemu_img_work_over_tls_with_a_client_certificate() {
    if !(have("qemu-img") && have("qemu-io") && have("openssl")) {
        return;
    }
    let (t, mut content) = TlsDaemon::start();
    let [object, creds, image_opts, spec] = t.qemu_args(&t.pki.client_dir);
    let out = run(Command::new("qemu-io").args([
        &object,
        &creds,
        &image_opts,
        &spec,
        "-c",
        "write -P 0x5a 1M 64k",
        "-c",
        "read -P 0x5a 1M 64k",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("wrote 65536/65536") && text.contains("read 65536/65536"),
        "{text}"
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    content[MIB as usize..(MIB + 64 * 1024) as usize].fill(0x5a);

    let out = run(Command::new("qemu-img").args(["info", &object, &creds, &image_opts, &spec]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("virtual size: 4 MiB"), "{text}");

    let copy = t.d.path("copy.img");
    run(Command::new("qemu-img").args([
        "convert",
        &object,
        &creds,
        "-O",
        "raw",
        &image_opts,
        &spec,
        copy.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(&copy).unwrap() == content,
        "qemu-img convert over TLS differs"
    );
    assert!(t.d.log().contains("NBD client on TLS"), "{}", t.d.log());
}

#[test]
fn nbdinfo_and_nbdcopy_work_over_nbds() {
    if !(have("nbdinfo") && have("nbdcopy") && have("openssl")) {
        return;
    }
    let (t, content) = TlsDaemon::start();
    let uri = t.nbds_uri(&t.pki.client_dir);
    let out = run(Command::new("nbdinfo").arg(&uri));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("export-size: 4194304"), "{text}");
    assert!(
        text.contains("newstyle-fixed with TLS"),
        "nbdinfo saw no TLS: {text}"
    );
    let copy = t.d.path("copy.img");
    run(Command::new("nbdcopy").args([&uri, copy.to_str().unwrap()]));
    assert!(
        std::fs::read(&copy).unwrap() == content,
        "nbdcopy over TLS differs"
    );
}

#[test]
fn clients_without_a_certificate_from_the_ca_or_without_tls_are_refused() {
    if !(have("qemu-img") && have("nbdinfo") && have("openssl")) {
        return;
    }
    let (t, _) = TlsDaemon::start();
    for (dir, who) in [
        (&t.pki.anonymous_dir, "no client certificate"),
        (&t.pki.stranger_dir, "a certificate from another CA"),
    ] {
        let [object, creds, image_opts, spec] = t.qemu_args(dir);
        let out = Command::new("qemu-img")
            .args(["info", &object, &creds, &image_opts, &spec])
            .output()
            .unwrap();
        let err = failed(&out);
        eprintln!("qemu-img with {who}: {err}");
        let out = Command::new("nbdinfo")
            .arg(t.nbds_uri(dir))
            .output()
            .unwrap();
        let err = failed(&out);
        eprintln!("nbdinfo with {who}: {err}");
    }
    // Plain text: refused before any export is named.
    let out = Command::new("nbdinfo")
        .arg(format!("nbd://localhost:{}/a.img", t.port))
        .output()
        .unwrap();
    let err = failed(&out);
    eprintln!("nbdinfo in plain text: {err}");
    assert!(
        t.d.log().contains("refused before TLS"),
        "no refusal logged: {}",
        t.d.log()
    );
    // The refusals cost the daemon nothing.
    let out = run(Command::new("nbdinfo").arg(t.nbds_uri(&t.pki.client_dir)));
    assert!(String::from_utf8_lossy(&out.stdout).contains("export-size: 4194304"));
}
