//! Generates the C header `blksnap.h` (cbindgen, settings in cbindgen.toml,
//! the crate documentation of src/lib.rs on top) and the pkg-config file
//! `blksnap.pc` (from blksnap.pc.in) into OUT_DIR, and copies both next to
//! the library: `<target>/<profile>/include/blksnap.h` and
//! `<target>/<profile>/pkgconfig/blksnap.pc`.
//!
//! blksnap.pc points at the build tree by default (prefix = the profile
//! directory, libdir = prefix, includedir = prefix/include), so that
//! `PKG_CONFIG_PATH=target/debug/pkgconfig pkg-config --libs blksnap` works
//! in place. For an installation, build with `BLKSNAP_PREFIX` (and, to
//! override `${prefix}/lib` and `${prefix}/include`, `BLKSNAP_LIBDIR`,
//! `BLKSNAP_INCLUDEDIR`) set; see README.md.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    if let Err(e) = run() {
        eprintln!("blksnap-capi build script: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let crate_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let version = env::var("CARGO_PKG_VERSION").map_err(|e| format!("CARGO_PKG_VERSION: {e}"))?;
    for input in ["build.rs", "src", "cbindgen.toml", "blksnap.pc.in"] {
        println!("cargo:rerun-if-changed={input}");
    }
    for var in ["BLKSNAP_PREFIX", "BLKSNAP_LIBDIR", "BLKSNAP_INCLUDEDIR"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let header = out_dir.join("blksnap.h");
    generate_header(&crate_dir, &version, &header)?;
    let profile_dir = profile_dir(&out_dir);
    let pc = out_dir.join("blksnap.pc");
    write_atomically(
        &pc,
        pkg_config(&crate_dir, &version, profile_dir.as_deref())?.as_bytes(),
    )?;

    match profile_dir {
        Some(dir) => {
            copy(&header, &dir.join("include").join("blksnap.h"))?;
            copy(&pc, &dir.join("pkgconfig").join("blksnap.pc"))?;
        }
        None => println!(
            "cargo:warning=OUT_DIR {} is not <target>/<profile>/build/<pkg>/out: blksnap.h and blksnap.pc stay there",
            out_dir.display()
        ),
    }
    Ok(())
}

/// `<target>/<profile>` from `<target>/<profile>/build/<pkg>-<hash>/out`.
fn profile_dir(out_dir: &Path) -> Option<PathBuf> {
    let build = out_dir.ancestors().nth(2)?;
    (out_dir.file_name()? == "out" && build.file_name()? == "build")
        .then(|| build.parent().map(Path::to_path_buf))?
}

/// The `//!` lines at the top of src/lib.rs, as a C comment.
fn crate_doc(lib_rs: &Path, version: &str) -> Result<String, String> {
    let text =
        fs::read_to_string(lib_rs).map_err(|e| format!("cannot read {}: {e}", lib_rs.display()))?;
    let mut comment =
        format!("/*\n * blksnap.h: libblksnap {version}, the C library of blksnapd.\n *\n");
    for line in text.lines().take_while(|l| l.starts_with("//!")) {
        let line = line
            .trim_start_matches("//!")
            .strip_prefix(' ')
            .unwrap_or_else(|| line.trim_start_matches("//!"));
        let line = line.replace("*/", "* /");
        if line.is_empty() {
            comment.push_str(" *\n");
        } else {
            comment.push_str(&format!(" * {line}\n"));
        }
    }
    comment.push_str(" */");
    Ok(comment)
}

fn generate_header(crate_dir: &Path, version: &str, header: &Path) -> Result<(), String> {
    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .map_err(|e| format!("cbindgen.toml: {e}"))?;
    let lib_rs = crate_dir.join("src").join("lib.rs");
    config.header = Some(crate_doc(&lib_rs, version)?);
    config.after_includes = Some(format!(
        "\n/* This header's library version. */\n#define BLKSNAP_VERSION \"{version}\""
    ));
    // with_src parses src/lib.rs and the modules it declares, without
    // running `cargo metadata` from inside the build.
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(&lib_rs)
        .generate()
        .map_err(|e| format!("cbindgen: {e}"))?;
    let mut text = Vec::new();
    bindings.write(&mut text);
    write_atomically(header, &text)
}

fn pkg_config(
    crate_dir: &Path,
    version: &str,
    profile_dir: Option<&Path>,
) -> Result<String, String> {
    let template_path = crate_dir.join("blksnap.pc.in");
    let template = fs::read_to_string(&template_path)
        .map_err(|e| format!("cannot read {}: {e}", template_path.display()))?;
    let var = |name: &str| env::var(name).ok().filter(|v| !v.is_empty());
    let (prefix, libdir, includedir) = match var("BLKSNAP_PREFIX") {
        Some(prefix) => (
            prefix,
            "${prefix}/lib".to_string(),
            "${prefix}/include".to_string(),
        ),
        None => {
            let dir =
                profile_dir.map_or_else(|| "/usr/local".to_string(), |d| d.display().to_string());
            (
                dir,
                "${prefix}".to_string(),
                "${prefix}/include".to_string(),
            )
        }
    };
    let libdir = var("BLKSNAP_LIBDIR").unwrap_or(libdir);
    let includedir = var("BLKSNAP_INCLUDEDIR").unwrap_or(includedir);
    Ok(template
        .replace("@PREFIX@", &prefix)
        .replace("@LIBDIR@", &libdir)
        .replace("@INCLUDEDIR@", &includedir)
        .replace("@VERSION@", version))
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    let bytes = fs::read(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    write_atomically(to, &bytes)
}

/// Writes through a temporary file and a rename, so that a concurrent build
/// or compiler never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let dir = path
        .parent()
        .ok_or_else(|| format!("{} has no parent", path.display()))?;
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path)
        .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
}
