//! errno names for the error replies: the protocol carries both the number
//! and the name, so clients on other systems need not share errno values.

const NAMES: &[(i32, &str)] = &[
    (1, "EPERM"),
    (2, "ENOENT"),
    (5, "EIO"),
    (9, "EBADF"),
    (11, "EAGAIN"),
    (12, "ENOMEM"),
    (13, "EACCES"),
    (16, "EBUSY"),
    (17, "EEXIST"),
    (19, "ENODEV"),
    (20, "ENOTDIR"),
    (21, "EISDIR"),
    (22, "EINVAL"),
    (27, "EFBIG"),
    (28, "ENOSPC"),
    (30, "EROFS"),
    (34, "ERANGE"),
    (61, "ENODATA"),
    (71, "EPROTO"),
    (74, "EBADMSG"),
    (75, "EOVERFLOW"),
    (93, "EPROTONOSUPPORT"),
    (95, "EOPNOTSUPP"),
    (110, "ETIMEDOUT"),
    (125, "ECANCELED"),
];

/// The symbolic name of an errno value ("EUNKNOWN" when not listed).
pub fn errno_name(errno: i32) -> &'static str {
    NAMES
        .iter()
        .find(|(n, _)| *n == errno)
        .map_or("EUNKNOWN", |(_, name)| name)
}

pub fn errno_from_name(name: &str) -> Option<i32> {
    NAMES.iter().find(|(_, n)| *n == name).map(|(e, _)| *e)
}
