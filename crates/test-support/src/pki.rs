//! A throw-away public key infrastructure for TLS tests, made with the
//! `openssl` command: a CA, a server certificate for `localhost` and
//! 127.0.0.1, a client certificate from the same CA, and one from another
//! CA. Client directories are laid out as qemu's `tls-creds-x509` and
//! libnbd's `tls-certificates` read them (`ca-cert.pem`, `client-cert.pem`,
//! `client-key.pem`).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestPki {
    /// The CA's certificate (`ca-cert.pem`).
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// CA, client certificate and key: a client the server admits.
    pub client_dir: PathBuf,
    /// The CA only: a client without a certificate of its own.
    pub anonymous_dir: PathBuf,
    /// The CA, and a client certificate signed by another CA.
    pub stranger_dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): scripts/install-deps installs it"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir`: `<name>-cert.pem` and `<name>-key.pem`.
fn ca(dir: &Path, name: &str) {
    let (cert, key) = (format!("{name}-cert.pem"), format!("{name}-key.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &cert,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate for `cn` signed by CA `ca`, for `usage` (serverAuth or
/// clientAuth), with the subject alternative names `san` (if any).
fn issue(dir: &Path, ca: &str, name: &str, cn: &str, usage: &str, san: Option<&str>) {
    let (cert, key, csr, ext) = (
        format!("{name}-cert.pem"),
        format!("{name}-key.pem"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    let mut extensions = format!(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
    );
    if let Some(san) = san {
        extensions.push_str(&format!("subjectAltName={san}\n"));
    }
    std::fs::write(dir.join(&ext), extensions).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            &ext,
        ],
    );
}

/// `files` of `dir`, copied into a new directory `dir/name` under the
/// names given.
fn client_dir(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir(&to).unwrap();
    for (from, as_name) in files {
        std::fs::copy(dir.join(from), to.join(as_name)).unwrap();
    }
    to
}

impl TestPki {
    /// The server options of blksnapd and `blksnap-backup serve` for this
    /// PKI: its certificate and key, clients checked against its CA.
    pub fn server_options(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.to_str().unwrap().to_string();
        vec![
            "--nbd-tls-cert".into(),
            path(&self.server_cert),
            "--nbd-tls-key".into(),
            path(&self.server_key),
            "--nbd-tls-ca".into(),
            path(&self.ca),
        ]
    }

    /// Makes every file under `dir` (which must exist).
    pub fn generate(dir: &Path) -> TestPki {
        ca(dir, "ca");
        ca(dir, "other-ca");
        issue(
            dir,
            "ca",
            "server",
            "localhost",
            "serverAuth",
            Some("DNS:localhost,IP:127.0.0.1"),
        );
        issue(dir, "ca", "client", "backup-client", "clientAuth", None);
        issue(dir, "other-ca", "stranger", "stranger", "clientAuth", None);
        TestPki {
            ca: dir.join("ca-cert.pem"),
            server_cert: dir.join("server-cert.pem"),
            server_key: dir.join("server-key.pem"),
            client_dir: client_dir(
                dir,
                "client",
                &[
                    ("ca-cert.pem", "ca-cert.pem"),
                    ("client-cert.pem", "client-cert.pem"),
                    ("client-key.pem", "client-key.pem"),
                ],
            ),
            anonymous_dir: client_dir(dir, "anonymous", &[("ca-cert.pem", "ca-cert.pem")]),
            stranger_dir: client_dir(
                dir,
                "stranger",
                &[
                    ("ca-cert.pem", "ca-cert.pem"),
                    ("stranger-cert.pem", "client-cert.pem"),
                    ("stranger-key.pem", "client-key.pem"),
                ],
            ),
        }
    }
}
