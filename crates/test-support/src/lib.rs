//! Helpers shared by the test suites of the blksnap crates: deterministic
//! test data ([`Pattern`]), sparse files, reading a change map, and whether
//! the tests run as root, and a throw-away PKI for TLS tests ([`pki`]).
//!
//! A dev-dependency only, never published. It depends on no blksnap crate,
//! so the tests of every crate, the engine's included, can use it.

pub mod pki;

use std::path::{Path, PathBuf};

/// Deterministic test data: `len` bytes made from a seed.
///
/// Every kind is a fixed function of `(seed, len)`, so a test makes the same
/// bytes again to check what it wrote. The kinds differ in their bytes and
/// in what they promise; each test suite keeps the kind its data was always
/// made with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `fastrand` seeded with `seed`, one `u8(..)` draw per byte: any value.
    Random,
    /// `fastrand` seeded with `seed`, one `u8(1..)` draw per byte: never
    /// zero, so zeroed ranges stand out.
    RandomNonZero,
    /// `fastrand` seeded with `seed`, filled by `Rng::fill` (eight bytes a
    /// draw): any value, and the quickest to make for large buffers. Not
    /// the bytes of [`Pattern::Random`] for the same seed.
    RandomFill,
    /// xorshift64 from `seed`, the low bit of every byte set: never zero,
    /// different for every seed, and independent of `fastrand`.
    XorShift,
    /// `1 + (seed + offset) % 251`: never zero, and every byte tells its
    /// offset modulo 251 (a prime, so never in step with a power of two).
    Ramp,
}

impl Pattern {
    /// `len` bytes of this pattern for `seed`.
    pub fn bytes(self, seed: u64, len: u64) -> Vec<u8> {
        let len = usize::try_from(len).expect("a pattern fits in memory");
        match self {
            Pattern::Random => {
                let mut rng = fastrand::Rng::with_seed(seed);
                (0..len).map(|_| rng.u8(..)).collect()
            }
            Pattern::RandomNonZero => {
                let mut rng = fastrand::Rng::with_seed(seed);
                (0..len).map(|_| rng.u8(1..)).collect()
            }
            Pattern::RandomFill => {
                let mut data = vec![0u8; len];
                fastrand::Rng::with_seed(seed).fill(&mut data);
                data
            }
            Pattern::XorShift => {
                let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x as u8) | 1
                    })
                    .collect()
            }
            Pattern::Ramp => (0..len as u64)
                .map(|i| (seed.wrapping_add(i) % 251) as u8 + 1)
                .collect(),
        }
    }
}

/// A sparse file `dir/name` of `size` bytes (truncated if it existed).
pub fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()))
        .set_len(size)
        .unwrap_or_else(|e| panic!("sizing {}: {e}", path.display()));
    path
}

/// The blocks a readable change map marks as changed after change number
/// `number`: the indices of the bytes greater than it.
pub fn changed_since(map: &[u8], number: u64) -> Vec<usize> {
    map.iter()
        .enumerate()
        .filter(|&(_, &b)| u64::from(b) > number)
        .map(|(i, _)| i)
        .collect()
}

/// Whether the effective user is root (read from /proc, without libc).
pub fn is_root() -> bool {
    // "Uid:\treal\teffective\tsaved\tfilesystem"
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by the helpers each suite had before they shared this one.
    const PINNED_RANDOM: [u8; 16] = [
        177, 61, 134, 176, 201, 122, 245, 42, 49, 200, 139, 71, 86, 97, 205, 4,
    ];
    const PINNED_RANDOM_NONZERO: [u8; 16] = [
        183, 171, 243, 78, 35, 77, 226, 98, 205, 124, 80, 180, 98, 141, 198, 96,
    ];
    const PINNED_RANDOM_FILL: [u8; 16] = [
        177, 190, 209, 182, 205, 189, 51, 168, 61, 254, 181, 170, 229, 151, 220, 136,
    ];
    const PINNED_XORSHIFT: [u8; 16] = [
        173, 119, 55, 117, 237, 121, 207, 235, 139, 143, 21, 3, 253, 159, 31, 255,
    ];
    const PINNED_RAMP: [u8; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

    /// The first bytes of every kind, pinned: the suites' data must not
    /// change under them (a new `fastrand` stream would show here first).
    #[test]
    fn patterns_are_pinned() {
        let cases: [(Pattern, u64, &[u8]); 5] = [
            (Pattern::Random, 1, &PINNED_RANDOM),
            (Pattern::RandomNonZero, 1, &PINNED_RANDOM_NONZERO),
            (Pattern::RandomFill, 1, &PINNED_RANDOM_FILL),
            (Pattern::XorShift, 1, &PINNED_XORSHIFT),
            (Pattern::Ramp, 0, &PINNED_RAMP),
        ];
        for (pattern, seed, pinned) in cases {
            assert_eq!(
                pattern.bytes(seed, pinned.len() as u64),
                pinned,
                "{pattern:?}"
            );
        }
        let ramp = Pattern::Ramp.bytes(0, 600);
        assert_eq!(
            (ramp[249], ramp[250], ramp[251], ramp[502]),
            (250, 251, 1, 1)
        );
        assert_eq!(Pattern::Ramp.bytes(5, 300)[..], ramp[5..305]);
    }

    #[test]
    fn patterns_are_deterministic_and_seeded() {
        for pattern in [
            Pattern::Random,
            Pattern::RandomNonZero,
            Pattern::RandomFill,
            Pattern::XorShift,
            Pattern::Ramp,
        ] {
            let a = pattern.bytes(7, 4099);
            assert_eq!(a.len(), 4099);
            assert_eq!(a, pattern.bytes(7, 4099), "{pattern:?}");
            assert_eq!(a[..100], pattern.bytes(7, 100)[..], "{pattern:?}: prefix");
            assert_ne!(a, pattern.bytes(8, 4099), "{pattern:?}: seed ignored");
            if pattern != Pattern::Random && pattern != Pattern::RandomFill {
                assert!(a.iter().all(|&b| b != 0), "{pattern:?} made a zero");
            }
        }
        assert_ne!(
            Pattern::Random.bytes(7, 64),
            Pattern::RandomFill.bytes(7, 64)
        );
    }

    #[test]
    fn changed_since_reads_the_map() {
        assert_eq!(changed_since(&[0, 2, 1, 3, 0], 0), [1, 2, 3]);
        assert_eq!(changed_since(&[0, 2, 1, 3, 0], 1), [1, 3]);
        assert!(changed_since(&[255], 255).is_empty());
    }

    #[test]
    fn sparse_file_has_the_size() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), [1u8; 100]).unwrap();
        let path = sparse_file(dir.path(), "f", 3 << 20);
        assert_eq!(path, dir.path().join("f"));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 20);
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    }
}
