//! Helpers shared by the engine's test suites. Every suite includes this
//! module and uses only some of it.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use blksnap_engine::{
    Config, CopyErrorPolicy, Engine, Event, ImageInfo, MemDevice, SnapshotOptions, StorageSpec,
};
use uuid::Uuid;

/// Small values so tests are fast: 64 KiB chunks and tracking blocks, 1 MiB
/// growth steps (at least the largest chunk, as `Config::validate` demands).
pub fn small_config() -> Config {
    let config = Config {
        diff_storage_minimum: 1 << 20,
        chunk_minimum_shift: 16,
        chunk_maximum_shift: 20,
        tracking_block_minimum_shift: 16,
        ..Config::default()
    };
    config.validate().expect("test config is valid");
    config
}

/// A taken snapshot of the devices `names`: create, add each, take.
pub fn snapshot_of<S: AsRef<str>>(
    engine: &Engine,
    names: &[S],
    storage: StorageSpec,
    options: SnapshotOptions,
) -> Uuid {
    let id = engine.snapshot_create(storage, options).unwrap();
    for name in names {
        engine.snapshot_add(&id, name.as_ref()).unwrap();
    }
    engine.snapshot_take(&id).unwrap();
    id
}

/// A taken snapshot of device `name` alone, with the default options.
pub fn snapshot_one(engine: &Engine, name: &str, storage: StorageSpec) -> Uuid {
    snapshot_of(engine, &[name], storage, SnapshotOptions::default())
}

/// Difference storage on a memory device of `size` bytes.
pub fn mem_storage(size: u64) -> StorageSpec {
    StorageSpec::Device(Arc::new(MemDevice::new(size)))
}

/// Default snapshot options but for the copy error policy.
pub fn on_copy_error(policy: CopyErrorPolicy) -> SnapshotOptions {
    SnapshotOptions {
        on_copy_error: Some(policy),
        ..SnapshotOptions::default()
    }
}

/// Every event of snapshot `id` queued so far, without waiting.
pub fn drain_events(engine: &Engine, id: &Uuid) -> Vec<Event> {
    wait_events(engine, id, Duration::ZERO)
}

/// The events of snapshot `id` until none comes within `quiet`.
pub fn wait_events(engine: &Engine, id: &Uuid, quiet: Duration) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(event) = engine.snapshot_wait_event(id, quiet).expect("wait event") {
        events.push(event);
    }
    events
}

/// Reads the whole image of `device` in snapshot `id` and fails at the
/// first byte that differs from `at_take` (naming it, its chunk and both
/// values); then checks the image is valid, destroys the snapshot and
/// returns the image's figures from before the destroy.
pub fn image_matches_then_destroy(
    engine: &Engine,
    id: &Uuid,
    device: &str,
    at_take: &[u8],
) -> ImageInfo {
    let image = engine.image(device).unwrap();
    // Not a value the image could hold by chance where it should be zero.
    let mut read = vec![0xEE; at_take.len()];
    image.read(&mut read, 0).unwrap();
    if let Some(at) = read.iter().zip(at_take).position(|(a, b)| a != b) {
        panic!(
            "the image differs from the origin at the take from byte {at} (chunk {}): {:#x}, not {:#x}",
            at as u64 / image.chunk_size(),
            read[at],
            at_take[at]
        );
    }
    drop(image);
    let info = engine
        .snapshot_info(id)
        .unwrap()
        .images
        .into_iter()
        .find(|i| i.device == device)
        .unwrap();
    assert_eq!(info.error_code, 0, "image of {device}");
    engine.snapshot_destroy(id).unwrap();
    info
}
