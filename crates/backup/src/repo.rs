//! The backup repository ([`Repository`]): content-addressed chunks and one
//! manifest per backup, in a directory (`docs/backup-format.md`).
//!
//! Layout:
//! - `blksnap-backup.json`: what this directory is (format version);
//! - `chunks/<2 hex>/<64 hex>`: one chunk, named by the BLAKE3 hash of its
//!   plain data, stored zstd-compressed behind a small header;
//! - `manifests/<id>.json`: one backup: its devices and, for each, one
//!   [`Region`] per chunk-sized piece of the device (a chunk, zeroes, or a
//!   base chunk with patches of changed blocks), followed by a line with
//!   the BLAKE3 of everything before it;
//! - `tmp/`: files being written, and each running backup's
//!   `staged-<uuid>/` directory of new chunks not yet published (a dead
//!   backup's are removed by prune);
//! - `lock`: `flock`ed shared by every backup, exclusively by `prune`, so
//!   that prune never removes a chunk that a running backup has found
//!   already stored and is about to name.
//!
//! Invariants: a name in `chunks/` always has its whole data on disk
//! (chunks are staged, synced, renamed into place, and the renames synced);
//! a manifest exists only once every chunk it names is in `chunks/`; files
//! are never changed once in place, so readers need no lock while a backup
//! runs. A backup that dies leaves at most unreferenced chunks and files in
//! `tmp/`.
//! Every chunk and manifest checks itself: a chunk by its name, a manifest
//! by its last line.
//!
//! Callers: the `create`, `list`, `verify` and `restore` commands.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The repository's marker file.
const MARKER: &str = "blksnap-backup.json";
/// Version 2: regions may be patched (version 1 had whole chunks only).
pub const FORMAT: u32 = 2;
/// Chunk file header: magic, version (1 byte), codec (1 byte), 2 zero
/// bytes, plain length (8 bytes).
const CHUNK_MAGIC: &[u8; 4] = b"BSCK";
const CHUNK_VERSION: u8 = 1;
/// Name prefix of a backup's staging directory in `tmp/`.
const STAGING_PREFIX: &str = "staged-";
const CHUNK_HEADER: usize = 4 + 1 + 1 + 2 + 8;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
/// zstd level: the fastest; file system data still compresses well.
const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("no backup {0} in this repository")]
    NoSuchBackup(String),
}

pub type Result<T> = std::result::Result<T, RepoError>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RepoError + '_ {
    move |source| RepoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

thread_local! {
    /// Each thread's buffer for a chunk's stored form (compressed or read).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A chunk's name: the BLAKE3 of its plain data, in hex.
pub type ChunkId = String;

pub fn chunk_id(data: &[u8]) -> ChunkId {
    blake3::hash(data).to_hex().to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Marker {
    format: u32,
}

/// One backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    /// Seconds since the epoch at the take.
    pub time: u64,
    pub host: String,
    pub devices: Vec<DeviceBackup>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceBackup {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub generation_id: Uuid,
    /// The readable map's change number at the take: the next backup can
    /// read only the blocks whose byte is above it.
    pub changes_number: u8,
    /// `full` or `incremental`, and why.
    pub mode: String,
    pub reason: String,
    pub chunk_size: u64,
    /// One entry per `chunk_size` bytes of the device, in order.
    pub chunks: Vec<Region>,
}

/// One chunk-sized region of a device as a backup holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Region {
    /// One chunk of the region's length, or `None`: zeroes.
    Whole(Option<ChunkId>),
    /// The base (a chunk of the region's length, or zeroes) with patches
    /// laid over it in order, a later one winning where they overlap: how
    /// an incremental stores a region of which few blocks changed, without
    /// reading or storing the rest again.
    Patched {
        base: Option<ChunkId>,
        patches: Vec<Patch>,
    },
}

/// Tracking blocks `[first, first + count)` of a region (cut at the
/// region's end), from one chunk of exactly that length (`None`: zeroes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch(pub u32, pub u32, pub Option<ChunkId>);

impl Patch {
    /// The bytes of the region it covers, `(offset, len)`.
    pub fn range(&self, block_size: u64, region_len: u64) -> (u64, u64) {
        let start = u64::from(self.0) * block_size;
        (
            start,
            (u64::from(self.1) * block_size).min(region_len - start),
        )
    }
}

impl Region {
    /// Every chunk the region reads, as (chunk, its offset in the region,
    /// its length).
    pub fn chunk_uses(&self, block_size: u64, region_len: u64) -> Vec<(&ChunkId, u64, u64)> {
        match self {
            Region::Whole(id) => id.iter().map(|id| (id, 0, region_len)).collect(),
            Region::Patched { base, patches } => base
                .iter()
                .map(|id| (id, 0, region_len))
                .chain(patches.iter().filter_map(|p| {
                    let (at, len) = p.range(block_size, region_len);
                    p.2.as_ref().map(|id| (id, at, len))
                }))
                .collect(),
        }
    }

    pub fn patch_count(&self) -> usize {
        match self {
            Region::Whole(_) => 0,
            Region::Patched { patches, .. } => patches.len(),
        }
    }

    /// Bytes the region takes in the manifest's chunk list.
    pub fn index_bytes(&self) -> usize {
        serde_json::to_string(self).expect("plain data").len() + 1
    }
}

/// The most manifest bytes a device's chunk list may take per region, on
/// average: 32 MiB per TiB with 4 MiB chunks. An incremental that would
/// patch past it reads the most patched regions whole instead.
pub const INDEX_BYTES_PER_REGION: usize = 128;

impl DeviceBackup {
    /// Bytes of region `i` (the last one may be short).
    pub fn region_len(&self, i: usize) -> u64 {
        let start = i as u64 * self.chunk_size;
        self.chunk_size.min(self.size - start)
    }

    /// Region `i`'s data into `data`, every chunk checked; an error names
    /// the device's byte range that cannot be read.
    pub fn read_region(&self, repo: &Repository, i: usize, data: &mut Vec<u8>) -> Result<()> {
        thread_local! {
            static PATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let at = i as u64 * self.chunk_size;
        let len = self.region_len(i);
        let named = |e: RepoError, from: u64, n: u64| {
            RepoError::Invalid(format!(
                "{}: bytes {}..{} cannot be read: {e}",
                self.name,
                at + from,
                at + from + n
            ))
        };
        let (base, patches) = match &self.chunks[i] {
            Region::Whole(base) => (base, &[][..]),
            Region::Patched { base, patches } => (base, &patches[..]),
        };
        match base {
            Some(id) => repo
                .get_chunk_into(id, len, data)
                .map_err(|e| named(e, 0, len))?,
            None => {
                data.clear();
                data.resize(len as usize, 0);
            }
        }
        for p in patches {
            let (from, n) = p.range(u64::from(self.block_size), len);
            let piece = &mut data[from as usize..(from + n) as usize];
            match &p.2 {
                Some(id) => PATCH.with_borrow_mut(|patch| {
                    repo.get_chunk_into(id, n, patch)
                        .map_err(|e| named(e, from, n))?;
                    piece.copy_from_slice(patch);
                    Ok(())
                })?,
                None => piece.fill(0),
            }
        }
        Ok(())
    }

    /// The shape a manifest must have for its regions to be read: checked
    /// when it is loaded, so that a manifest whose checksum holds but whose
    /// content is inconsistent is damage with a name, not a panic later.
    fn check(&self) -> std::result::Result<(), String> {
        let bs = u64::from(self.block_size);
        if bs == 0 || self.chunk_size == 0 || self.chunk_size % bs != 0 {
            return Err(format!(
                "chunk size {} is not whole blocks of {bs}",
                self.chunk_size
            ));
        }
        let regions = self.size.div_ceil(self.chunk_size);
        if self.chunks.len() as u64 != regions {
            return Err(format!(
                "{} regions for {} bytes in regions of {}",
                self.chunks.len(),
                self.size,
                self.chunk_size
            ));
        }
        let hash = |id: &ChunkId| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
        for (i, region) in self.chunks.iter().enumerate() {
            let (base, patches) = match region {
                Region::Whole(base) => (base, &[][..]),
                Region::Patched { base, patches } => (base, &patches[..]),
            };
            let len = self.region_len(i);
            let patch_ok = |p: &Patch| {
                p.1 > 0
                    && u64::from(p.0) * bs < len
                    && u64::from(p.0) + u64::from(p.1) <= self.chunk_size / bs
                    && p.2.as_ref().is_none_or(hash)
            };
            if !base.as_ref().is_none_or(hash) || !patches.iter().all(patch_ok) {
                return Err(format!("region {i} is malformed"));
            }
        }
        Ok(())
    }

    /// Whether region `i` reads as zeroes without reading a chunk.
    pub fn region_is_hole(&self, i: usize) -> bool {
        self.chunks[i] == Region::Whole(None)
    }
}

/// What `prune` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct PruneStats {
    pub backups_removed: usize,
    pub chunks_removed: usize,
    pub bytes_freed: u64,
}

/// What damage `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Damage {
    pub backup: String,
    pub device: Option<String>,
    /// Byte range of the device (offset, length).
    pub range: Option<(u64, u64)>,
    pub what: String,
}

#[derive(Debug)]
pub struct Repository {
    root: PathBuf,
    /// Where this process's new chunks wait, durable only after
    /// [`Repository::sync_chunks`], which then moves them into `chunks/`.
    staging: PathBuf,
}

impl Repository {
    /// Opens the repository at `root`, creating it when `create` and the
    /// directory is missing or empty. Anything else (a file, a directory
    /// with other content, another format) is refused, naming it.
    pub fn open(root: &Path, create: bool) -> Result<Repository> {
        let marker = root.join(MARKER);
        match fs::symlink_metadata(root) {
            Ok(m) if !m.is_dir() => {
                return Err(RepoError::Invalid(format!(
                    "repository {} is not a directory",
                    root.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir_all(root).map_err(io_at(root))?;
            }
            Err(e) => return Err(io_at(root)(e)),
        }
        let repo = Repository {
            root: root.to_path_buf(),
            staging: root
                .join("tmp")
                .join(format!("{STAGING_PREFIX}{}", Uuid::new_v4())),
        };
        if !marker.exists() {
            let empty = fs::read_dir(root).map_err(io_at(root))?.next().is_none();
            if !(create && empty) {
                return Err(RepoError::Invalid(format!(
                    "{} is not a blksnap-backup repository (no {MARKER}){}",
                    root.display(),
                    if create { " and not empty" } else { "" }
                )));
            }
            for dir in ["chunks", "manifests", "tmp"] {
                fs::create_dir_all(root.join(dir)).map_err(io_at(root))?;
            }
            let bytes = serde_json::to_vec(&Marker { format: FORMAT }).expect("plain struct");
            repo.write_durably(&marker, &bytes)?;
        }
        let bytes = fs::read(&marker).map_err(io_at(&marker))?;
        let m: Marker = serde_json::from_slice(&bytes).map_err(|e| {
            RepoError::Invalid(format!(
                "{}: not a repository marker: {e}",
                marker.display()
            ))
        })?;
        if m.format != FORMAT {
            return Err(RepoError::Invalid(format!(
                "{}: format {}, this tool reads {FORMAT}",
                marker.display(),
                m.format
            )));
        }
        Ok(repo)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn chunk_path(&self, id: &str) -> PathBuf {
        self.root.join("chunks").join(&id[..2]).join(id)
    }

    fn tmp_file(&self) -> PathBuf {
        self.root.join("tmp").join(Uuid::new_v4().to_string())
    }

    /// Writes `parts` to a temp file, fsyncs it (when `sync`) and renames
    /// it to `path`; returns the open file and its length.
    fn write_in_place(&self, path: &Path, parts: &[&[u8]], sync: bool) -> Result<(File, u64)> {
        let tmp = self.tmp_file();
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        let mut len = 0;
        for part in parts {
            f.write_all(part).map_err(io_at(&tmp))?;
            len += part.len() as u64;
        }
        if sync {
            f.sync_all().map_err(io_at(&tmp))?;
        }
        fs::rename(&tmp, path).map_err(io_at(path))?;
        Ok((f, len))
    }

    /// [`Repository::write_in_place`], then fsyncs `path`'s directory.
    fn write_durably(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        self.write_in_place(path, &[bytes], true)?;
        sync_dir(path.parent().expect("a file in a directory"))
    }

    pub fn has_chunk(&self, id: &str) -> bool {
        self.chunk_path(id).exists()
    }

    /// Stages a chunk unless the repository has it already (whole) or this
    /// backup staged it; returns whether it was new and its stored size.
    /// It becomes durable, then visible in `chunks/`, with
    /// [`Repository::sync_chunks`], before any manifest names it. Data that
    /// zstd cannot shrink by 1/32 is stored as it is.
    pub fn put_chunk(&self, id: &str, data: &[u8]) -> Result<Option<u64>> {
        // A published chunk is whole: it is renamed into `chunks/` only
        // after its data is on disk. The header check still guards against
        // files that older versions renamed in before a sync.
        if stored_whole(&self.chunk_path(id), data.len() as u64) {
            return Ok(None);
        }
        let path = self.staging.join(id);
        if path.exists() {
            return Ok(None);
        }
        fs::create_dir_all(&self.staging).map_err(io_at(&self.staging))?;
        SCRATCH.with_borrow_mut(|compressed| {
            // One buffer per thread, reused: no 4 MiB allocation (and its
            // page faults) per chunk.
            compressed.resize(zstd::zstd_safe::compress_bound(data.len()), 0);
            let n = zstd::bulk::compress_to_buffer(data, compressed, ZSTD_LEVEL)
                .map_err(io_at(&path))?;
            let (codec, body) = if n < data.len() - data.len() / 32 {
                (CODEC_ZSTD, &compressed[..n])
            } else {
                (CODEC_RAW, data)
            };
            let mut header = [0u8; CHUNK_HEADER];
            header[..4].copy_from_slice(CHUNK_MAGIC);
            header[4..8].copy_from_slice(&[CHUNK_VERSION, codec, 0, 0]);
            header[8..].copy_from_slice(&(data.len() as u64).to_le_bytes());
            if !self.write_staged(&path, &[&header, body])? {
                return Ok(None);
            }
            Ok(Some((CHUNK_HEADER + body.len()) as u64))
        })
    }

    /// Writes a staged chunk file straight under its name (no temp file:
    /// the staging directory is this backup's own and is published only
    /// once every writer is done), without fsync: [`Repository::sync_chunks`]
    /// makes chunks durable together. Returns false when another thread of
    /// this backup is writing the same chunk. Large ones get write-behind:
    /// its writeback starts now, and this thread's previous large chunk
    /// file is waited for and its pages dropped. Small ones (patches of a
    /// few blocks) are left to the sync: waiting for each would cost more
    /// than the page cache they hold.
    fn write_staged(&self, path: &Path, parts: &[&[u8]]) -> Result<bool> {
        const WRITE_BEHIND_MIN: u64 = 1 << 20;
        thread_local! {
            static PREVIOUS: std::cell::RefCell<Option<(File, u64)>> =
                const { std::cell::RefCell::new(None) };
        }
        let mut f = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_at(path)(e)),
        };
        let mut len = 0;
        for part in parts {
            f.write_all(part).map_err(io_at(path))?;
            len += part.len() as u64;
        }
        if len >= WRITE_BEHIND_MIN {
            start_writeback(&f, 0, len);
            if let Some((previous, plen)) = PREVIOUS.with_borrow_mut(|p| p.replace((f, len))) {
                drop_written(&previous, 0, plen);
            }
        }
        Ok(true)
    }

    /// Makes the chunks this backup staged durable, then visible: one
    /// `syncfs` of the repository's filesystem (their data), each renamed
    /// into `chunks/`, and a second `syncfs` (the renames). A name in
    /// `chunks/` thus always has its whole data on disk, whatever power
    /// loss comes when; what an interrupted backup leaves is its staging
    /// directory, which prune removes. `ids` are every chunk the backup
    /// names (those it found published have nothing staged).
    pub fn sync_chunks(&self, ids: &BTreeSet<String>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let syncfs = || {
            let root = File::open(&self.root).map_err(io_at(&self.root))?;
            rustix::fs::syncfs(&root).map_err(|e| io_at(&self.root)(e.into()))
        };
        syncfs()?;
        let mut moved = false;
        for id in ids {
            let staged = self.staging.join(id);
            if !staged.exists() {
                continue;
            }
            let path = self.chunk_path(id);
            let dir = path.parent().expect("chunks/xx");
            fs::create_dir_all(dir).map_err(io_at(dir))?;
            fs::rename(&staged, &path).map_err(io_at(&path))?;
            moved = true;
        }
        if moved {
            syncfs()?;
        }
        let _ = fs::remove_dir(&self.staging);
        Ok(())
    }

    /// A chunk's plain data, checked against its name and length.
    pub fn get_chunk(&self, id: &str, len: u64) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.get_chunk_into(id, len, &mut data)?;
        Ok(data)
    }

    /// [`Repository::get_chunk`] into `data`, whose buffer is reused.
    pub fn get_chunk_into(&self, id: &str, len: u64, data: &mut Vec<u8>) -> Result<()> {
        SCRATCH.with_borrow_mut(|bytes| self.read_chunk(id, len, bytes, data))
    }

    fn read_chunk(
        &self,
        id: &str,
        len: u64,
        bytes: &mut Vec<u8>,
        data: &mut Vec<u8>,
    ) -> Result<()> {
        let path = self.chunk_path(id);
        let file = read_uncached(&path, bytes).map_err(io_at(&path))?;
        let bytes = &bytes[file];
        let bad = |what: &str| RepoError::Invalid(format!("chunk {}: {what}", path.display()));
        if bytes.len() < CHUNK_HEADER || &bytes[..4] != CHUNK_MAGIC {
            return Err(bad("not a chunk file"));
        }
        let plain = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        if plain != len {
            return Err(bad(&format!(
                "holds {plain} bytes, the manifest says {len}"
            )));
        }
        match (bytes[4], bytes[5]) {
            (CHUNK_VERSION, CODEC_ZSTD) => {
                data.resize(len as usize, 0);
                let n = zstd::bulk::decompress_to_buffer(&bytes[CHUNK_HEADER..], &mut data[..])
                    .map_err(|e| bad(&format!("cannot decompress: {e}")))?;
                data.truncate(n);
            }
            (CHUNK_VERSION, CODEC_RAW) => {
                data.clear();
                data.extend_from_slice(&bytes[CHUNK_HEADER..]);
            }
            (v, c) => return Err(bad(&format!("version {v}, codec {c}: unknown"))),
        }
        if data.len() as u64 != len || chunk_id(data) != id {
            return Err(bad("content does not match its hash"));
        }
        Ok(())
    }

    /// Writes a manifest, making it visible only once it is durable.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        // Compact: the chunk list is most of it (one line, no indentation).
        let mut bytes = serde_json::to_vec(manifest).expect("plain struct");
        bytes.push(b'\n');
        let sum = blake3::hash(&bytes).to_hex().to_string();
        bytes.extend_from_slice(format!("blake3 {sum}\n").as_bytes());
        let path = self.manifest_path(&manifest.id);
        self.write_durably(&path, &bytes)
    }

    fn manifest_path(&self, id: &str) -> PathBuf {
        self.root.join("manifests").join(format!("{id}.json"))
    }

    /// A manifest, checked against its own checksum line.
    pub fn manifest(&self, id: &str) -> Result<Manifest> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(RepoError::NoSuchBackup(id.to_string()));
        }
        let path = self.manifest_path(id);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(io_at(&path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RepoError::NoSuchBackup(id.to_string()))
            }
            Err(e) => return Err(io_at(&path)(e)),
        };
        let bad = |what: String| RepoError::Invalid(format!("manifest {}: {what}", path.display()));
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not text".into()))?;
        let body_end = text
            .trim_end_matches('\n')
            .rfind('\n')
            .map(|i| i + 1)
            .ok_or_else(|| bad("no checksum line (truncated?)".into()))?;
        let (body, last) = text.split_at(body_end);
        let sum = last
            .trim_end()
            .strip_prefix("blake3 ")
            .ok_or_else(|| bad("no checksum line (truncated?)".into()))?;
        if blake3::hash(body.as_bytes()).to_hex().as_str() != sum {
            return Err(bad("checksum mismatch".into()));
        }
        let m: Manifest =
            serde_json::from_str(body).map_err(|e| bad(format!("unreadable: {e}")))?;
        if m.format != FORMAT || m.id != id {
            return Err(bad(format!("format {} id {}", m.format, m.id)));
        }
        for d in &m.devices {
            d.check()
                .map_err(|e| bad(format!("device {}: {e}", d.name)))?;
        }
        Ok(m)
    }

    /// Backup ids, oldest first (ids sort by time).
    pub fn backup_ids(&self) -> Result<Vec<String>> {
        let dir = self.root.join("manifests");
        let mut ids: Vec<String> = fs::read_dir(&dir)
            .map_err(io_at(&dir))?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".json")
                    .map(str::to_string)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The newest readable backup holding `device`.
    pub fn last_backup_of(&self, device: &str) -> Option<(Manifest, usize)> {
        let ids = self.backup_ids().ok()?;
        ids.iter().rev().find_map(|id| {
            let m = self.manifest(id).ok()?;
            let i = m.devices.iter().position(|d| d.name == device)?;
            Some((m, i))
        })
    }

    /// Re-reads every chunk the backups reference (`ids`, or all) and
    /// checks it; returns what is damaged.
    pub fn verify(&self, ids: &[String]) -> Result<Vec<Damage>> {
        let mut damage = Vec::new();
        let mut good = BTreeSet::new();
        let mut buf = Vec::new();
        for id in ids {
            let manifest = match self.manifest(id) {
                Ok(m) => m,
                Err(e) => {
                    damage.push(Damage {
                        backup: id.clone(),
                        device: None,
                        range: None,
                        what: e.to_string(),
                    });
                    continue;
                }
            };
            for d in &manifest.devices {
                for (i, region) in d.chunks.iter().enumerate() {
                    let start = i as u64 * d.chunk_size;
                    let uses = region.chunk_uses(u64::from(d.block_size), d.region_len(i));
                    for (chunk, at, len) in uses {
                        if good.contains(&(chunk.clone(), len)) {
                            continue;
                        }
                        match self.get_chunk_into(chunk, len, &mut buf) {
                            Ok(_) => {
                                good.insert((chunk.clone(), len));
                            }
                            Err(e) => damage.push(Damage {
                                backup: id.clone(),
                                device: Some(d.name.clone()),
                                range: Some((start + at, len)),
                                what: e.to_string(),
                            }),
                        }
                    }
                }
            }
        }
        Ok(damage)
    }

    /// Holds the repository's lock, shared (a backup) or exclusive
    /// (prune), until the returned file is dropped. Never waits: a busy
    /// repository is an error naming why.
    pub fn lock(&self, exclusive: bool) -> Result<File> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_at(&path))?;
        let mode = if exclusive {
            rustix::fs::FlockOperation::NonBlockingLockExclusive
        } else {
            rustix::fs::FlockOperation::NonBlockingLockShared
        };
        rustix::fs::flock(&file, mode).map_err(|e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                RepoError::Invalid(format!(
                    "repository {} is busy: {}",
                    self.root.display(),
                    if exclusive {
                        "a backup is running or a backup is being served"
                    } else {
                        "prune is running"
                    }
                ))
            } else {
                io_at(&path)(e.into())
            }
        })?;
        Ok(file)
    }

    /// Keeps the newest `keep` backups: removes the other manifests, then
    /// every chunk no remaining manifest names. Crash-safe: manifests go
    /// first (durably), so an interruption leaves only unreferenced chunks.
    /// Refused while a backup runs, or when a remaining manifest is
    /// unreadable (its chunks cannot be told apart).
    pub fn prune(&self, keep: usize) -> Result<PruneStats> {
        let _lock = self.lock(true)?;
        let ids = self.backup_ids()?;
        let cut = ids.len().saturating_sub(keep);
        let (old, kept) = ids.split_at(cut);
        let mut referenced = BTreeSet::new();
        for id in kept {
            let m = self.manifest(id).map_err(|e| {
                RepoError::Invalid(format!("not pruning: backup {id} is damaged ({e})"))
            })?;
            for d in &m.devices {
                for (i, region) in d.chunks.iter().enumerate() {
                    let uses = region.chunk_uses(u64::from(d.block_size), d.region_len(i));
                    referenced.extend(uses.into_iter().map(|(id, _, _)| id.clone()));
                }
            }
        }
        for id in old {
            let path = self.manifest_path(id);
            fs::remove_file(&path).map_err(io_at(&path))?;
        }
        sync_dir(&self.root.join("manifests"))?;
        let mut stats = PruneStats {
            backups_removed: old.len(),
            ..PruneStats::default()
        };
        let chunks = self.root.join("chunks");
        for dir in fs::read_dir(&chunks).map_err(io_at(&chunks))?.flatten() {
            let Ok(entries) = fs::read_dir(dir.path()) else {
                continue;
            };
            for chunk in entries.flatten() {
                let name = chunk.file_name().to_string_lossy().into_owned();
                if referenced.contains(&name) {
                    continue;
                }
                let len = chunk.metadata().map_or(0, |m| m.len());
                fs::remove_file(chunk.path()).map_err(io_at(&chunk.path()))?;
                stats.chunks_removed += 1;
                stats.bytes_freed += len;
            }
        }
        self.clean_tmp();
        Ok(stats)
    }

    /// Removes what dead backups left in `tmp/`: files being written and
    /// staging directories of chunks never published.
    pub fn clean_tmp(&self) {
        if let Ok(entries) = fs::read_dir(self.root.join("tmp")) {
            for e in entries.flatten() {
                let staged = e.file_name().to_string_lossy().starts_with(STAGING_PREFIX);
                let _ = if staged {
                    fs::remove_dir_all(e.path())
                } else {
                    fs::remove_file(e.path())
                };
            }
        }
    }
}

/// Whether the chunk file at `path` is there whole, for a chunk of `len`
/// plain bytes, as far as its header and length tell without reading it
/// (a cut zstd body is found only when the chunk is read).
fn stored_whole(path: &Path, len: u64) -> bool {
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let mut header = [0u8; CHUNK_HEADER];
    let (Ok(meta), Ok(())) = (file.metadata(), file.read_exact(&mut header)) else {
        return false;
    };
    let plain = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    &header[..4] == CHUNK_MAGIC
        && header[4] == CHUNK_VERSION
        && plain == len
        && match header[5] {
            CODEC_RAW => meta.len() == CHUNK_HEADER as u64 + len,
            CODEC_ZSTD => meta.len() > CHUNK_HEADER as u64,
            _ => false,
        }
}

/// Alignment of `O_DIRECT` buffers, offsets and lengths (enough for every
/// logical block size).
const DIRECT_ALIGN: usize = 4096;

/// Reads the whole file at `path` into `buf`; returns where in `buf` it
/// is. Bypasses the page cache (`O_DIRECT`) where the filesystem allows
/// it: a restore or verify reads each chunk once, and filling the page
/// cache only to evict it again costs more CPU than the disk read (on this
/// project's machines, about 3× for a buffered restore). Falls back to a
/// buffered read elsewhere (tmpfs).
fn read_uncached(path: &Path, buf: &mut Vec<u8>) -> io::Result<std::ops::Range<usize>> {
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let mut file = match direct {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            buf.clear();
            File::open(path)?.read_to_end(buf)?;
            return Ok(0..buf.len());
        }
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len() as usize;
    let whole = len.next_multiple_of(DIRECT_ALIGN);
    // The slack aligns the slice we read into; the buffer itself need not
    // be aligned.
    if buf.len() < whole + DIRECT_ALIGN {
        buf.resize(whole + DIRECT_ALIGN, 0);
    }
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
    let target = &mut buf[start..start + whole];
    let mut at = 0;
    // Reads of whole aligned blocks; only the last one comes back short.
    while at < len {
        match file.read(&mut target[at..])? {
            0 => break,
            n => at += n,
        }
    }
    Ok(start..start + at)
}

/// Write-behind, as nbdcopy does, in two halves: the writer starts the
/// writeback of what it just wrote, and waits for what it wrote before and
/// drops those pages ([`drop_written`]), so the page cache does not fill
/// with a whole device (fresh pages are what a backup or restore spends its
/// time on). Hints only: errors show at the final sync.
pub(crate) fn start_writeback(file: &File, at: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on our own open descriptor; no memory is
    // passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            at as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// The second half of write-behind: waits until `[at, at+len)` of `file` is
/// written back, then drops its pages.
pub(crate) fn drop_written(file: &File, at: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: as in `start_writeback`.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            at as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    let _ = rustix::fs::fadvise(
        file,
        at,
        std::num::NonZeroU64::new(len),
        rustix::fs::Advice::DontNeed,
    );
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, chunks: Vec<Option<ChunkId>>) -> Manifest {
        patched_manifest(id, chunks.into_iter().map(Region::Whole).collect())
    }

    fn patched_manifest(id: &str, chunks: Vec<Region>) -> Manifest {
        Manifest {
            format: FORMAT,
            id: id.into(),
            time: 1,
            host: "h".into(),
            devices: vec![DeviceBackup {
                name: "d".into(),
                size: 3 * 1024 - 100,
                block_size: 512,
                generation_id: Uuid::new_v4(),
                changes_number: 1,
                mode: "full".into(),
                reason: "first backup".into(),
                chunk_size: 1024,
                chunks,
            }],
        }
    }

    #[test]
    fn chunks_and_manifests_round_trip_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(&dir.path().join("r"), true).unwrap();
        let a = vec![7u8; 1024];
        let b = vec![9u8; 1024 - 100];
        let (ia, ib) = (chunk_id(&a), chunk_id(&b));
        assert!(repo.put_chunk(&ia, &a).unwrap().is_some());
        assert!(repo.put_chunk(&ia, &a).unwrap().is_none(), "deduplicated");
        repo.put_chunk(&ib, &b).unwrap();
        // Staged, not visible until published.
        assert!(!repo.has_chunk(&ia) && !repo.has_chunk(&ib));
        repo.sync_chunks(&[ia.clone(), ib.clone()].into()).unwrap();
        assert!(repo.has_chunk(&ia) && repo.has_chunk(&ib));
        assert!(repo.put_chunk(&ia, &a).unwrap().is_none(), "deduplicated");
        let m = manifest(
            "20260101T000000Z-0001",
            vec![Some(ia.clone()), None, Some(ib.clone())],
        );
        repo.put_manifest(&m).unwrap();
        assert_eq!(repo.manifest(&m.id).unwrap(), m);
        assert_eq!(repo.get_chunk(&ib, 924).unwrap(), b);
        assert!(repo.verify(std::slice::from_ref(&m.id)).unwrap().is_empty());
        // A flipped byte in a chunk: named with its device and range.
        let path = repo.chunk_path(&ib);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let damage = repo.verify(std::slice::from_ref(&m.id)).unwrap();
        assert_eq!(damage.len(), 1);
        assert_eq!(damage[0].range, Some((2048, 924)));
        // A truncated manifest.
        let mpath = repo.manifest_path(&m.id);
        let text = fs::read(&mpath).unwrap();
        fs::write(&mpath, &text[..text.len() - 10]).unwrap();
        assert!(matches!(repo.manifest(&m.id), Err(RepoError::Invalid(_))));
        assert!(matches!(
            repo.manifest("nope"),
            Err(RepoError::NoSuchBackup(_))
        ));
    }

    /// A patched region reads as its base with the patches laid over it in
    /// order; verify names a damaged patch by its own range; prune keeps
    /// the chunks only patches use.
    #[test]
    fn patched_regions_read_verify_and_survive_prune() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(&dir.path().join("r"), true).unwrap();
        let base = vec![1u8; 1024];
        let p1 = vec![2u8; 1024]; // blocks 0..2 of the short last region
        let p2 = vec![3u8; 512]; // block 1 again, later: it wins
        let tail = vec![4u8; 412]; // block 1 of the short 3rd region (924 bytes): cut at its end
        let ids: Vec<ChunkId> = [&base, &p1, &p2, &tail]
            .iter()
            .map(|d| {
                let id = chunk_id(d);
                repo.put_chunk(&id, d).unwrap();
                id
            })
            .collect();
        repo.sync_chunks(&ids.iter().cloned().collect()).unwrap();
        let m = patched_manifest(
            "1",
            vec![
                Region::Patched {
                    base: Some(ids[0].clone()),
                    patches: vec![
                        Patch(0, 2, Some(ids[1].clone())),
                        Patch(1, 1, Some(ids[2].clone())),
                    ],
                },
                Region::Patched {
                    base: None,
                    patches: vec![Patch(1, 1, None)],
                },
                Region::Patched {
                    base: None,
                    patches: vec![Patch(1, 1, Some(ids[3].clone()))],
                },
            ],
        );
        repo.put_manifest(&m).unwrap();
        let d = &repo.manifest("1").unwrap().devices[0];
        assert_eq!(d, &m.devices[0], "regions round-trip through JSON");
        let mut data = Vec::new();
        d.read_region(&repo, 0, &mut data).unwrap();
        let mut want = vec![2u8; 512];
        want.extend([3u8; 512]);
        assert_eq!(data, want);
        d.read_region(&repo, 1, &mut data).unwrap();
        assert_eq!(data, vec![0u8; 1024]);
        d.read_region(&repo, 2, &mut data).unwrap();
        let mut want = vec![0u8; 512];
        want.extend([4u8; 412]);
        assert_eq!(data, want);
        // A newer backup names only the base: the patches' chunks go with
        // the old one, the base stays.
        repo.put_manifest(&manifest("2", vec![Some(ids[0].clone()), None, None]))
            .unwrap();
        let path = repo.chunk_path(&ids[2]);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let damage = repo.verify(&["1".into()]).unwrap();
        assert_eq!(damage.len(), 1, "{damage:?}");
        assert_eq!(damage[0].range, Some((512, 512)));
        let e = d.read_region(&repo, 0, &mut data).unwrap_err().to_string();
        assert!(e.contains("bytes 512..1024"), "{e}");
        repo.put_manifest(&manifest("3", vec![None, None, None]))
            .unwrap();
        let stats = repo.prune(2).unwrap();
        assert_eq!((stats.backups_removed, stats.chunks_removed), (1, 3));
        assert!(repo.has_chunk(&ids[0]));
    }

    /// A chunk is in `chunks/` only once published (synced first); what a
    /// backup that dies before that leaves is its staging directory, which
    /// the next backup does not trust and prune removes.
    #[test]
    fn staged_chunks_are_invisible_until_published_and_prune_removes_dead_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        let a = vec![5u8; 1000];
        let ia = chunk_id(&a);
        let dead = Repository::open(&root, true).unwrap();
        assert!(dead.put_chunk(&ia, &a).unwrap().is_some());
        drop(dead); // died before sync_chunks
        let staged = || {
            fs::read_dir(root.join("tmp"))
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(STAGING_PREFIX))
                .count()
        };
        assert_eq!(staged(), 1);
        let repo = Repository::open(&root, false).unwrap();
        assert!(!repo.has_chunk(&ia), "a dead backup's chunk is visible");
        assert!(
            repo.put_chunk(&ia, &a).unwrap().is_some(),
            "deduplicated against a dead backup's staged chunk"
        );
        repo.sync_chunks(&[ia.clone()].into()).unwrap();
        assert!(repo.has_chunk(&ia));
        assert_eq!(repo.get_chunk(&ia, 1000).unwrap(), a);
        assert_eq!(staged(), 1, "published: its own staging directory is gone");
        repo.prune(10).unwrap();
        assert_eq!(staged(), 0, "prune left a dead backup's staging directory");
        assert!(!repo.has_chunk(&ia), "no manifest names it: pruned");
    }

    /// A manifest whose checksum holds but whose shape does not (a region
    /// too many, a patch past its region, a bad hash) is damage with a
    /// name, never a panic when read.
    #[test]
    fn inconsistent_manifests_are_refused_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(&dir.path().join("r"), true).unwrap();
        let h = || Some("ab".repeat(32));
        let cases: Vec<(&str, Vec<Region>)> = vec![
            ("regions", vec![Region::Whole(None); 4]),
            (
                "malformed",
                vec![
                    Region::Whole(None),
                    Region::Whole(None),
                    // The last region is 924 bytes: block 1 starts at 512,
                    // block 2 would start past its end.
                    Region::Patched {
                        base: None,
                        patches: vec![Patch(2, 1, h())],
                    },
                ],
            ),
            (
                "malformed",
                vec![
                    Region::Whole(Some("xyz".into())),
                    Region::Whole(None),
                    Region::Whole(None),
                ],
            ),
        ];
        for (n, (needle, chunks)) in cases.into_iter().enumerate() {
            let id = format!("bad{n}");
            repo.put_manifest(&patched_manifest(&id, chunks)).unwrap();
            let e = repo.manifest(&id).unwrap_err().to_string();
            assert!(e.contains(needle), "case {n}: {e}");
        }
        let good = patched_manifest(
            "good",
            vec![
                Region::Whole(h()),
                Region::Whole(None),
                Region::Patched {
                    base: h(),
                    patches: vec![Patch(1, 1, None)],
                },
            ],
        );
        repo.put_manifest(&good).unwrap();
        assert_eq!(repo.manifest("good").unwrap(), good);
    }

    #[test]
    fn prune_waits_for_no_backup_and_keeps_what_is_referenced() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(&dir.path().join("r"), true).unwrap();
        let (a, b) = (vec![1u8; 1024], vec![2u8; 1024]);
        let (ia, ib) = (chunk_id(&a), chunk_id(&b));
        repo.put_chunk(&ia, &a).unwrap();
        repo.put_chunk(&ib, &b).unwrap();
        repo.sync_chunks(&[ia.clone(), ib.clone()].into()).unwrap();
        repo.put_manifest(&manifest("1", vec![Some(ia.clone()), None, None]))
            .unwrap();
        repo.put_manifest(&manifest("2", vec![Some(ib.clone()), None, None]))
            .unwrap();
        let backup = repo.lock(false).unwrap();
        let e = repo.prune(1).unwrap_err().to_string();
        assert!(e.contains("a backup is running"), "{e}");
        drop(backup);
        let stats = repo.prune(1).unwrap();
        assert_eq!((stats.backups_removed, stats.chunks_removed), (1, 1));
        assert_eq!(repo.backup_ids().unwrap(), ["2"]);
        assert!(repo.has_chunk(&ib) && !repo.has_chunk(&ia));
        assert!(repo.verify(&["2".into()]).unwrap().is_empty());
    }

    #[test]
    fn only_empty_directories_become_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let e = Repository::open(&file, true).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let full = dir.path().join("full");
        fs::create_dir(&full).unwrap();
        fs::write(full.join("other"), b"x").unwrap();
        let e = Repository::open(&full, true).unwrap_err().to_string();
        assert!(e.contains("not a blksnap-backup repository"), "{e}");
        let e = Repository::open(&dir.path().join("missing"), false).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
