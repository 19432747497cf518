//! An in-memory block device for tests and benchmarks, with fault injection
//! (failing writes, slow I/O) to exercise the failure policy.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use super::BlockDevice;

#[derive(Debug)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    min_io: u32,
    fail_writes: AtomicBool,
    fail_reads: AtomicBool,
    delay_micros: AtomicU64,
}

impl MemDevice {
    pub fn new(size: u64) -> Self {
        Self::with_min_io(size, 512)
    }

    pub fn with_min_io(size: u64, min_io: u32) -> Self {
        Self {
            data: RwLock::new(vec![0; size as usize]),
            min_io,
            fail_writes: AtomicBool::new(false),
            fail_reads: AtomicBool::new(false),
            delay_micros: AtomicU64::new(0),
        }
    }

    /// From now on every write, discard and write-zeroes fails with EIO.
    pub fn set_fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// From now on every read fails with EIO.
    pub fn set_fail_reads(&self, fail: bool) {
        self.fail_reads.store(fail, Ordering::SeqCst);
    }

    /// Every I/O sleeps this long first.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_micros
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// A copy of the whole content.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap().clone()
    }

    fn before_io(&self, write: bool) -> io::Result<()> {
        let delay = self.delay_micros.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        let fail = if write {
            &self.fail_writes
        } else {
            &self.fail_reads
        };
        if fail.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::IO.raw_os_error(),
            ));
        }
        Ok(())
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.data.read().unwrap().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} beyond memory device of {size} bytes"),
            )),
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }

    fn min_io_size(&self) -> u32 {
        self.min_io
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.before_io(false)?;
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.read().unwrap()[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.before_io(true)?;
        let r = self.range(offset, buf.len() as u64)?;
        self.data.write().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.before_io(true)?;
        let r = self.range(offset, len)?;
        self.data.write().unwrap()[r].fill(0);
        Ok(())
    }
}
