//! The engine's error type. Every variant maps to an errno value
//! ([`Error::errno`]) because the control plane reports errno names, and every
//! message names the device, range or limit involved.

use rustix::io::Errno;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{what} is busy: {why}")]
    Busy { what: String, why: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(
        "{device}: range of {len} bytes at offset {offset} is outside the device ({size} bytes)"
    )]
    OutOfRange {
        device: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("not permitted: {0}")]
    WrongState(String),
    #[error("difference storage of snapshot {snapshot} is full: {detail}")]
    NoSpace { snapshot: String, detail: String },
    #[error("snapshot image of {device} is corrupted: {cause}")]
    Corrupted {
        device: String,
        cause: String,
        errno: i32,
    },
    #[error("{what} timed out after {millis} ms")]
    TimedOut { what: String, millis: u128 },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The errno value the control plane reports for this error.
    pub fn errno(&self) -> i32 {
        let e = match self {
            Error::NotFound(_) => Errno::NOENT,
            Error::AlreadyExists(_) => Errno::EXIST,
            Error::Busy { .. } => Errno::BUSY,
            Error::InvalidArgument(_) | Error::OutOfRange { .. } => Errno::INVAL,
            Error::WrongState(_) => Errno::PERM,
            Error::NoSpace { .. } => Errno::NOSPC,
            Error::Corrupted { .. } => Errno::IO,
            Error::TimedOut { .. } => Errno::TIMEDOUT,
            Error::Io { source, .. } => {
                return source.raw_os_error().unwrap_or(Errno::IO.raw_os_error())
            }
        };
        e.raw_os_error()
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
