//! Where a block device's sectors physically live, read from sysfs, so a
//! difference storage that shares media with a tracked origin can be refused
//! even when the two are different device nodes (a partition of a tracked
//! disk, the disk of a tracked partition, a device-mapper or md device
//! stacked over either).
//!
//! Owns [`MediaSpan`], [`media_spans`], [`spans_overlap`] and
//! [`shares_media`]. The difference-storage check (`check_not_served` in
//! `diff_storage.rs`) is the caller; it passes [`SYSFS_ROOT`], tests pass a
//! fake tree.
//!
//! How a device number resolves (`/sys/dev/block/MAJ:MIN` is a symlink into
//! `/sys/devices/...`):
//! - a partition (its directory has a `partition` file) is `start`/`size`
//!   sectors of its parent disk, the parent directory of its canonical sysfs
//!   directory, whose `dev` file names it;
//! - a whole disk is `(itself, 0, size)`;
//! - anything with `slaves/` entries (device-mapper, md) additionally covers
//!   every slave's spans *in full*: without the mapping table, which sysfs
//!   does not expose, any slave sector may be used. A partition of such a
//!   device inherits its parent's slaves the same way. So two partitions of
//!   one md array, or two kpartx devices over one multipath device, are
//!   reported as sharing media: a refusal, never a missed overlap.
//!
//! Invariants:
//! - The answer errs towards overlap. Whatever sysfs does not tell us
//!   becomes [`UNKNOWN_SECTORS`] (to the end of the disk); a device sysfs
//!   knows nothing of is itself, as a whole disk of unknown size, so the
//!   comparison degrades to exact device numbers and no further.
//! - Every device contributes its own span as well as its slaves', so a
//!   device always overlaps itself and anything stacked on it.
//! - Both sides are resolved downwards only (`slaves/`): if either is stacked
//!   on the other, the upper one's spans contain the lower one's, so reading
//!   `holders/` adds nothing.
//! - Resolution terminates: each device is visited once, and stacking deeper
//!   than [`MAX_DEPTH`] is not followed (real sysfs has no cycles, but a
//!   corrupt or fake tree must not hang the daemon).

use std::collections::HashSet;
use std::path::Path;

/// The real sysfs mount point.
pub(crate) const SYSFS_ROOT: &str = "/sys";

/// Length of a span whose size sysfs did not give: to the end of the disk,
/// so it overlaps anything at or after its start.
pub(crate) const UNKNOWN_SECTORS: u64 = u64::MAX;

/// Stacking deeper than this is not followed. Real stacks (dm-crypt over LVM
/// over md over partitions) are a handful of levels.
const MAX_DEPTH: usize = 16;

/// A run of 512-byte sectors of one whole disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct MediaSpan {
    /// `(major, minor)` of a whole device, never a partition: a disk, or a
    /// stacked device such as `dm-0` or `md0`.
    pub(crate) disk: (u32, u32),
    /// First sector, in 512-byte units as sysfs gives them.
    pub(crate) start: u64,
    /// Length in 512-byte sectors; [`UNKNOWN_SECTORS`] if unknown.
    pub(crate) sectors: u64,
}

impl MediaSpan {
    /// One past the last sector; saturates so unknown lengths reach the end.
    fn end(&self) -> u64 {
        self.start.saturating_add(self.sectors)
    }

    fn overlaps(&self, other: &MediaSpan) -> bool {
        // An empty span (a zero-sized partition) holds no sector to share.
        self.disk == other.disk
            && self.sectors > 0
            && other.sectors > 0
            && self.start < other.end()
            && other.start < self.end()
    }
}

/// Every span of media that the block device `rdev` may read or write,
/// resolved through the sysfs tree at `sysfs_root` (normally [`SYSFS_ROOT`]).
/// Never empty: at worst it is the device itself with an unknown size.
pub(crate) fn media_spans(rdev: u64, sysfs_root: &Path) -> Vec<MediaSpan> {
    let dev = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    resolve(sysfs_root, dev, 0, &mut seen, &mut out);
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether any span of `a` shares a sector with any span of `b`.
pub(crate) fn spans_overlap(a: &[MediaSpan], b: &[MediaSpan]) -> bool {
    a.iter().any(|x| b.iter().any(|y| x.overlaps(y)))
}

/// Whether block devices `a_rdev` and `b_rdev` may share media.
pub(crate) fn shares_media(a_rdev: u64, b_rdev: u64, sysfs_root: &Path) -> bool {
    // The same node shares media with itself whatever sysfs says, even when
    // it reports zero sectors.
    a_rdev == b_rdev
        || spans_overlap(
            &media_spans(a_rdev, sysfs_root),
            &media_spans(b_rdev, sysfs_root),
        )
}

/// Appends the spans of `dev` and of everything beneath it to `out`.
fn resolve(
    root: &Path,
    dev: (u32, u32),
    depth: usize,
    seen: &mut HashSet<(u32, u32)>,
    out: &mut Vec<MediaSpan>,
) {
    if !seen.insert(dev) {
        // Already counted (a diamond such as md over two partitions of one
        // disk), or a cycle.
        return;
    }
    let link = root.join(format!("dev/block/{}:{}", dev.0, dev.1));
    // Canonical, so the parent of a partition is its disk's directory and
    // not `/sys/dev/block`.
    let Ok(dir) = std::fs::canonicalize(&link) else {
        out.push(MediaSpan {
            disk: dev,
            start: 0,
            sectors: UNKNOWN_SECTORS,
        });
        return;
    };

    // Which directory's slaves hold this device's lower media: its own for
    // a disk, its parent's for a partition.
    let lower_dir;
    if dir.join("partition").exists() {
        let parent = dir.parent().map(Path::to_path_buf);
        match parent.as_deref().and_then(|p| read_dev(&p.join("dev"))) {
            Some(disk) => {
                // Without a start we cannot place it on the disk: take the
                // whole disk.
                let span = match read_u64(&dir.join("start")) {
                    Some(start) => MediaSpan {
                        disk,
                        start,
                        sectors: read_u64(&dir.join("size")).unwrap_or(UNKNOWN_SECTORS),
                    },
                    None => MediaSpan {
                        disk,
                        start: 0,
                        sectors: UNKNOWN_SECTORS,
                    },
                };
                out.push(span);
                lower_dir = parent;
            }
            None => {
                out.push(MediaSpan {
                    disk: dev,
                    start: 0,
                    sectors: UNKNOWN_SECTORS,
                });
                return;
            }
        }
    } else {
        // Zero means no media yet (an unattached loop device, an empty
        // drive); media may appear later at any size.
        let sectors = match read_u64(&dir.join("size")) {
            Some(0) | None => UNKNOWN_SECTORS,
            Some(n) => n,
        };
        out.push(MediaSpan {
            disk: dev,
            start: 0,
            sectors,
        });
        lower_dir = Some(dir);
    }

    let Some(lower_dir) = lower_dir else {
        return;
    };
    let slaves = slave_devs(&lower_dir);
    if slaves.is_empty() {
        return;
    }
    if depth + 1 >= MAX_DEPTH {
        tracing::warn!(
            major = dev.0,
            minor = dev.1,
            "block devices stacked deeper than {MAX_DEPTH} levels; \
             not following them further when looking for shared media"
        );
        return;
    }
    for slave in slaves {
        resolve(root, slave, depth + 1, seen, out);
    }
}

/// `MAJ:MIN` of each entry under `dir/slaves/`; entries whose `dev` cannot
/// be read are skipped (there is nothing to compare them by).
fn slave_devs(dir: &Path) -> Vec<(u32, u32)> {
    let Ok(entries) = std::fs::read_dir(dir.join("slaves")) else {
        return Vec::new();
    };
    let mut devs: Vec<(u32, u32)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| read_dev(&e.path().join("dev")))
        .collect();
    // Directory order is arbitrary; keep the walk deterministic.
    devs.sort_unstable();
    devs
}

/// Parses a sysfs `dev` file: `MAJ:MIN\n`.
fn read_dev(path: &Path) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Parses a sysfs decimal number file such as `size` or `start`.
fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::makedev;
    use std::fs;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    /// A fake sysfs with the real shape: device directories under
    /// `devices/...`, partitions nested in their disk's directory,
    /// `dev/block/MAJ:MIN` and `slaves/`/`holders/` entries as relative
    /// symlinks.
    struct FakeSys {
        dir: TempDir,
    }

    const PCI: &str = "devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block";
    const VIRTUAL: &str = "devices/virtual/block";

    /// `../` once per component of `rel`, to climb from inside `rel` back
    /// to the root.
    fn up(rel: &str) -> String {
        "../".repeat(Path::new(rel).components().count())
    }

    impl FakeSys {
        fn new() -> Self {
            let dir = TempDir::new().unwrap();
            fs::create_dir_all(dir.path().join("dev/block")).unwrap();
            FakeSys { dir }
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        /// Creates the device directory `rel` with `dev` and the
        /// `dev/block` link; returns `rel`.
        fn node(&self, rel: String, dev: (u32, u32)) -> String {
            let abs = self.root().join(&rel);
            fs::create_dir_all(abs.join("holders")).unwrap();
            fs::write(abs.join("dev"), format!("{}:{}\n", dev.0, dev.1)).unwrap();
            symlink(
                format!("../../{rel}"),
                self.root().join(format!("dev/block/{}:{}", dev.0, dev.1)),
            )
            .unwrap();
            rel
        }

        /// A whole disk under `parent` (PCI or VIRTUAL).
        fn disk(&self, parent: &str, name: &str, dev: (u32, u32), size: u64) -> String {
            let rel = self.node(format!("{parent}/{name}"), dev);
            let abs = self.root().join(&rel);
            fs::create_dir_all(abs.join("slaves")).unwrap();
            fs::write(abs.join("size"), format!("{size}\n")).unwrap();
            rel
        }

        /// A partition nested in disk directory `disk`, as the kernel does.
        fn partition(
            &self,
            disk: &str,
            name: &str,
            dev: (u32, u32),
            number: u32,
            start: u64,
            size: u64,
        ) -> String {
            let rel = self.node(format!("{disk}/{name}"), dev);
            let abs = self.root().join(&rel);
            fs::write(abs.join("partition"), format!("{number}\n")).unwrap();
            fs::write(abs.join("start"), format!("{start}\n")).unwrap();
            fs::write(abs.join("size"), format!("{size}\n")).unwrap();
            rel
        }

        /// Stacks `upper` on `lower`: `upper/slaves/<lower>` and
        /// `lower/holders/<upper>`, both relative links.
        fn stack(&self, upper: &str, lower: &str) {
            let name = |rel: &str| Path::new(rel).file_name().unwrap().to_owned();
            symlink(
                format!("{}{lower}", up(&format!("{upper}/slaves"))),
                self.root().join(upper).join("slaves").join(name(lower)),
            )
            .unwrap();
            symlink(
                format!("{}{upper}", up(&format!("{lower}/holders"))),
                self.root().join(lower).join("holders").join(name(upper)),
            )
            .unwrap();
        }

        fn spans(&self, dev: (u32, u32)) -> Vec<MediaSpan> {
            media_spans(makedev(dev.0, dev.1), self.root())
        }

        fn shares(&self, a: (u32, u32), b: (u32, u32)) -> bool {
            let (a, b) = (makedev(a.0, a.1), makedev(b.0, b.1));
            let ab = shares_media(a, b, self.root());
            assert_eq!(ab, shares_media(b, a, self.root()), "not symmetric");
            ab
        }
    }

    const SDA: (u32, u32) = (8, 0);
    const SDA1: (u32, u32) = (8, 1);
    const SDA2: (u32, u32) = (8, 2);
    const SDA3: (u32, u32) = (8, 3);
    const SDB: (u32, u32) = (8, 16);
    const SDB1: (u32, u32) = (8, 17);
    const DM0: (u32, u32) = (253, 0);
    const DM1: (u32, u32) = (253, 1);
    const MD0: (u32, u32) = (9, 0);
    const MD0P1: (u32, u32) = (259, 0);
    const MD0P2: (u32, u32) = (259, 1);

    fn span(disk: (u32, u32), start: u64, sectors: u64) -> MediaSpan {
        MediaSpan {
            disk,
            start,
            sectors,
        }
    }

    /// sda (1000 sectors) with sda1 = [100, 400) and sda2 = [400, 900).
    fn two_partitions() -> (FakeSys, String, String, String) {
        let sys = FakeSys::new();
        let sda = sys.disk(PCI, "sda", SDA, 1000);
        let sda1 = sys.partition(&sda, "sda1", SDA1, 1, 100, 300);
        let sda2 = sys.partition(&sda, "sda2", SDA2, 2, 400, 500);
        (sys, sda, sda1, sda2)
    }

    #[test]
    fn disk_and_partition_resolve_through_symlinks() {
        let (sys, ..) = two_partitions();
        assert_eq!(sys.spans(SDA), vec![span(SDA, 0, 1000)]);
        assert_eq!(sys.spans(SDA1), vec![span(SDA, 100, 300)]);
        assert_eq!(sys.spans(SDA2), vec![span(SDA, 400, 500)]);
    }

    #[test]
    fn partition_overlaps_its_whole_disk_both_directions() {
        let (sys, ..) = two_partitions();
        assert!(sys.shares(SDA1, SDA));
        assert!(sys.shares(SDA, SDA2));
    }

    #[test]
    fn disjoint_partitions_do_not_overlap() {
        let sys = FakeSys::new();
        let sda = sys.disk(PCI, "sda", SDA, 1000);
        sys.partition(&sda, "sda1", SDA1, 1, 0, 100);
        sys.partition(&sda, "sda2", SDA2, 2, 500, 100);
        assert!(!sys.shares(SDA1, SDA2));
    }

    #[test]
    fn adjacent_partitions_do_not_overlap_overlapping_ones_do() {
        let (sys, sda, ..) = two_partitions();
        // sda1 ends at 400 where sda2 starts.
        assert!(!sys.shares(SDA1, SDA2));
        // A table with sda3 = [350, 450) straddling both.
        sys.partition(&sda, "sda3", SDA3, 3, 350, 100);
        assert!(sys.shares(SDA3, SDA1));
        assert!(sys.shares(SDA3, SDA2));
    }

    #[test]
    fn dm_over_partition_overlaps_partition_and_disk_not_sibling() {
        let (sys, _sda, sda1, _sda2) = two_partitions();
        // Whole-slave rule: dm-0 might map only part of sda1, but without
        // its table it is taken to cover all of sda1, and no more.
        let dm0 = sys.disk(VIRTUAL, "dm-0", DM0, 50);
        sys.stack(&dm0, &sda1);
        assert_eq!(sys.spans(DM0), vec![span(SDA, 100, 300), span(DM0, 0, 50)]);
        assert!(sys.shares(DM0, SDA1));
        assert!(sys.shares(DM0, SDA));
        assert!(!sys.shares(DM0, SDA2));
    }

    #[test]
    fn stacks_resolve_all_the_way_down() {
        let (sys, _sda, sda1, _sda2) = two_partitions();
        let dm0 = sys.disk(VIRTUAL, "dm-0", DM0, 300);
        let dm1 = sys.disk(VIRTUAL, "dm-1", DM1, 200);
        sys.stack(&dm0, &sda1);
        sys.stack(&dm1, &dm0);
        assert!(sys.shares(DM1, DM0));
        assert!(sys.shares(DM1, SDA1));
        assert!(sys.shares(DM1, SDA));
        assert!(!sys.shares(DM1, SDA2));
    }

    #[test]
    fn md_over_two_disks_and_its_partitions() {
        let sys = FakeSys::new();
        let sda = sys.disk(PCI, "sda", SDA, 1000);
        let sdb = sys.disk(PCI, "sdb", SDB, 1000);
        let sda1 = sys.partition(&sda, "sda1", SDA1, 1, 0, 500);
        sys.partition(&sda, "sda2", SDA2, 2, 500, 500);
        let sdb1 = sys.partition(&sdb, "sdb1", SDB1, 1, 0, 1000);
        let md0 = sys.disk(VIRTUAL, "md0", MD0, 1400);
        sys.stack(&md0, &sda1);
        sys.stack(&md0, &sdb1);
        sys.partition(&md0, "md0p1", MD0P1, 1, 0, 700);
        sys.partition(&md0, "md0p2", MD0P2, 2, 700, 700);

        assert!(sys.shares(MD0, SDA1));
        assert!(sys.shares(MD0, SDB));
        assert!(!sys.shares(MD0, SDA2));
        // A partition of md0 lies on md0 and, through it, on all of md0's
        // slaves.
        assert!(sys.shares(MD0P1, MD0));
        assert!(sys.shares(MD0P1, SDA1));
        assert!(sys.shares(MD0P1, SDB));
        assert!(!sys.shares(MD0P1, SDA2));
        // The whole-slave rule's price: sibling partitions of a stacked
        // device both cover all of its slaves, so they are reported as
        // sharing media although their md0 ranges are disjoint.
        assert!(sys.shares(MD0P1, MD0P2));
    }

    #[test]
    fn different_disks_never_overlap() {
        let sys = FakeSys::new();
        let sda = sys.disk(PCI, "sda", SDA, 1000);
        let sdb = sys.disk(PCI, "sdb", SDB, 1000);
        sys.partition(&sda, "sda1", SDA1, 1, 0, 1000);
        sys.partition(&sdb, "sdb1", SDB1, 1, 0, 1000);
        assert!(!sys.shares(SDA, SDB));
        assert!(!sys.shares(SDA1, SDB1));
        assert!(!sys.shares(SDA, SDB1));
    }

    #[test]
    fn missing_sysfs_falls_back_to_exact_device() {
        let sys = FakeSys::new();
        assert_eq!(sys.spans(SDA1), vec![span(SDA1, 0, UNKNOWN_SECTORS)]);
        assert!(sys.shares(SDA1, SDA1));
        assert!(!sys.shares(SDA1, SDA));
        assert!(!sys.shares(SDA1, SDA2));
        // Not even a root: same answer.
        let gone = sys.root().join("no-such-sysfs");
        assert!(shares_media(makedev(8, 1), makedev(8, 1), &gone));
        assert!(!shares_media(makedev(8, 1), makedev(8, 0), &gone));
    }

    #[test]
    fn unreadable_numbers_err_towards_overlap() {
        let (sys, sda, sda1, _) = two_partitions();
        // sda1 without `size`: to the end of the disk, so it reaches sda2.
        fs::remove_file(sys.root().join(&sda1).join("size")).unwrap();
        assert_eq!(sys.spans(SDA1), vec![span(SDA, 100, UNKNOWN_SECTORS)]);
        assert!(sys.shares(SDA1, SDA2));
        // A partition whose parent has no `dev`: only itself.
        fs::remove_file(sys.root().join(&sda).join("dev")).unwrap();
        assert_eq!(sys.spans(SDA2), vec![span(SDA2, 0, UNKNOWN_SECTORS)]);
    }

    #[test]
    fn zero_sized_disk_is_unknown_size() {
        let sys = FakeSys::new();
        sys.disk(VIRTUAL, "loop0", (7, 0), 0);
        assert_eq!(sys.spans((7, 0)), vec![span((7, 0), 0, UNKNOWN_SECTORS)]);
    }

    #[test]
    fn slaves_cycle_terminates() {
        let sys = FakeSys::new();
        let dm0 = sys.disk(VIRTUAL, "dm-0", DM0, 10);
        let dm1 = sys.disk(VIRTUAL, "dm-1", DM1, 10);
        sys.stack(&dm0, &dm1);
        sys.stack(&dm1, &dm0);
        assert_eq!(sys.spans(DM0), vec![span(DM0, 0, 10), span(DM1, 0, 10)]);
        assert!(sys.shares(DM0, DM1));
    }

    #[test]
    fn deep_stack_stops_at_max_depth() {
        let sys = FakeSys::new();
        let mut lower = sys.disk(PCI, "sda", SDA, 10);
        for i in 0..(MAX_DEPTH as u32 + 4) {
            let upper = sys.disk(VIRTUAL, &format!("dm-{i}"), (253, i), 10);
            sys.stack(&upper, &lower);
            lower = upper;
        }
        let top = (253, MAX_DEPTH as u32 + 3);
        assert_eq!(sys.spans(top).len(), MAX_DEPTH);
        // sda is out of reach; the last level seen still overlaps.
        assert!(!sys.shares(top, SDA));
        assert!(sys.shares(top, (253, 4)));
    }

    #[test]
    fn span_boundaries() {
        let a = span(SDA, 0, 10);
        assert!(spans_overlap(&[a], &[span(SDA, 9, 1)]));
        assert!(!spans_overlap(&[a], &[span(SDA, 10, 1)]));
        assert!(!spans_overlap(&[a], &[span(SDB, 0, 10)]));
        assert!(!spans_overlap(&[a], &[span(SDA, 5, 0)]));
        assert!(!spans_overlap(&[a], &[]));
        let unknown = span(SDA, 5, UNKNOWN_SECTORS);
        assert!(spans_overlap(&[unknown], &[span(SDA, u64::MAX - 1, 1)]));
        assert!(spans_overlap(&[unknown], &[a]));
    }

    #[test]
    fn real_loop_device_is_a_whole_disk() {
        let root = Path::new(SYSFS_ROOT);
        let Some(minor) = (0..256).find(|m| root.join(format!("dev/block/7:{m}")).exists()) else {
            return;
        };
        let size = read_u64(&root.join(format!("dev/block/7:{minor}/size"))).unwrap();
        let sectors = if size == 0 { UNKNOWN_SECTORS } else { size };
        assert_eq!(
            media_spans(makedev(7, minor), root),
            vec![span((7, minor), 0, sectors)]
        );
        assert!(shares_media(makedev(7, minor), makedev(7, minor), root));
    }
}
