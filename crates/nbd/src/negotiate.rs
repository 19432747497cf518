//! The handshake phase (fixed newstyle): option haggling until the client
//! picks an export with `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`, or leaves.
//! Unknown options get `NBD_REP_ERR_UNSUP`; malformed ones
//! `NBD_REP_ERR_INVALID`; a broken handshake closes the connection.

use std::io::{self, Read, Write};

use std::sync::Arc;

use crate::export::{self, Context, Export, ExportSource};
use crate::protocol::*;

/// What the client chose: the export and how to talk to it.
pub struct Session {
    pub export: Arc<dyn Export>,
    pub structured: bool,
    /// Extended headers: 32-byte requests and replies with 64-bit lengths;
    /// every reply is an extended chunk (this takes precedence over
    /// `structured`).
    pub extended: bool,
    pub contexts: Vec<Context>,
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

/// A cursor over an option's payload that reports short data as malformed.
struct Payload<'a>(&'a [u8]);

impl Payload<'_> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_at_checked(2)?;
        self.0 = t;
        Some(u16::from_be_bytes(h.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_at_checked(4)?;
        self.0 = t;
        Some(u32::from_be_bytes(h.try_into().ok()?))
    }
    fn string(&mut self, len: u32) -> Option<String> {
        let (h, t) = self.0.split_at_checked(len as usize)?;
        self.0 = t;
        String::from_utf8(h.to_vec()).ok()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn send(w: &mut impl Write, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
    w.write_all(&option_reply(option, kind, payload))
}

fn send_error(w: &mut impl Write, option: u32, kind: u32, message: &str) -> io::Result<()> {
    send(w, option, kind, message.as_bytes())
}

/// Where TLS stands on a connection during option haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsState {
    /// The server has no TLS: STARTTLS is refused.
    Unavailable,
    /// STARTTLS is accepted; plain text too.
    Offered,
    /// Nothing but STARTTLS and ABORT until TLS is on (FORCEDTLS).
    Required,
    /// The connection is encrypted.
    Active,
}

/// How option haggling ended.
pub enum Outcome {
    /// The client chose an export.
    Export(Session),
    /// STARTTLS was acknowledged: the caller runs the TLS handshake, then
    /// haggles again on the encrypted stream, from a clean state.
    StartTls,
    /// The client left without an export (ABORT, unknown EXPORT_NAME,
    /// hanging up).
    Leave,
}

/// Sends the greeting and reads the client's flags; returns whether the
/// client asked for no zeroes after EXPORT_NAME's reply.
pub fn greet<S: Read + Write>(stream: &mut S) -> io::Result<bool> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello)?;
    let client_flags = read_u32(stream)?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(invalid("unknown client flags"));
    }
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

/// Option haggling, until the client picks an export, starts TLS or
/// leaves. State set by options (structured replies, contexts) starts
/// empty: after STARTTLS nothing from before it may be kept.
pub fn haggle<S: Read + Write>(
    stream: &mut S,
    source: &dyn ExportSource,
    tls: TlsState,
    no_zeroes: bool,
) -> io::Result<Outcome> {
    let mut structured = false;
    let mut extended = false;
    // Contexts chosen by SET_META_CONTEXT, for the export they were set on.
    let mut selected: Option<Selected> = None;
    loop {
        let mut header = [0u8; 16];
        match stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Leave),
            Err(e) => return Err(e),
        }
        if u64::from_be_bytes(header[..8].try_into().unwrap()) != IHAVEOPT {
            return Err(invalid("option without IHAVEOPT magic"));
        }
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(header[12..16].try_into().unwrap());
        tracing::debug!(
            option = option_name(option),
            code = option,
            len,
            "NBD option"
        );
        // Before required TLS, only STARTTLS and ABORT are read for what
        // they say: every other option gets the same refusal, whatever its
        // size or content.
        let before_tls = tls == TlsState::Required && option != OPT_STARTTLS && option != OPT_ABORT;
        let data = if len > MAX_OPTION_LEN {
            // EXPORT_NAME has no option reply: the only answer is to hang up.
            if len > 1 << 20 || option == OPT_EXPORT_NAME {
                return Err(invalid("option payload too large"));
            }
            io::copy(&mut Read::by_ref(stream).take(len as u64), &mut io::sink())?;
            if !before_tls {
                send_error(stream, option, REP_ERR_TOO_BIG, "option payload too large")?;
                continue;
            }
            Vec::new()
        } else {
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data)?;
            data
        };
        if before_tls {
            if option == OPT_EXPORT_NAME {
                // EXPORT_NAME cannot be refused: the only answer is to hang up.
                tracing::info!("NBD client chose an export without TLS, which is required");
                return Ok(Outcome::Leave);
            }
            tracing::debug!(
                option = option_name(option),
                "NBD option refused before TLS, which is required"
            );
            send_error(
                stream,
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            )?;
            continue;
        }
        match option {
            OPT_STARTTLS => match tls {
                _ if !data.is_empty() => {
                    send_error(stream, option, REP_ERR_INVALID, "STARTTLS takes no data")?
                }
                TlsState::Unavailable => send_error(
                    stream,
                    option,
                    REP_ERR_POLICY,
                    "this server is not configured for TLS",
                )?,
                TlsState::Active => {
                    send_error(stream, option, REP_ERR_INVALID, "TLS is already on")?
                }
                TlsState::Offered | TlsState::Required => {
                    send(stream, option, REP_ACK, &[])?;
                    return Ok(Outcome::StartTls);
                }
            },
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if extended {
                    // The spec forbids it, and its reply cannot say no.
                    tracing::info!(
                        export = %name,
                        "NBD client sent EXPORT_NAME after EXTENDED_HEADERS"
                    );
                    return Ok(Outcome::Leave);
                }
                let Some(export) = source.open(&name) else {
                    tracing::info!(export = %name, "NBD client asked for an unknown export");
                    return Ok(Outcome::Leave);
                };
                // No error reply exists for EXPORT_NAME: hang up.
                if let Err(why) = stale_contexts(&selected, &name, &*export) {
                    tracing::info!(export = %name, "{why}");
                    return Ok(Outcome::Leave);
                }
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&export.size().to_be_bytes());
                reply.extend_from_slice(
                    &export::transmission_flags(&*export, structured || extended).to_be_bytes(),
                );
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&reply)?;
                let contexts = contexts_for(&selected, &name);
                return Ok(Outcome::Export(Session {
                    export,
                    structured,
                    extended,
                    contexts,
                }));
            }
            OPT_ABORT => {
                let _ = send(stream, option, REP_ACK, &[]);
                return Ok(Outcome::Leave);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_error(stream, option, REP_ERR_INVALID, "LIST takes no data")?;
                    continue;
                }
                for name in source.names() {
                    let mut p = (name.len() as u32).to_be_bytes().to_vec();
                    p.extend_from_slice(name.as_bytes());
                    send(stream, option, REP_SERVER, &p)?;
                }
                send(stream, option, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    )?;
                } else if extended {
                    // The spec's answer: no going back to 20-byte chunks.
                    send_error(
                        stream,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are on, and take precedence over structured replies",
                    )?;
                } else if structured {
                    send_error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "structured replies already on",
                    )?;
                } else {
                    structured = true;
                    send(stream, option, REP_ACK, &[])?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    send_error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "EXTENDED_HEADERS takes no data",
                    )?;
                } else if extended {
                    send_error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "extended headers already on",
                    )?;
                } else {
                    // Also after STRUCTURED_REPLY, which it then supersedes.
                    extended = true;
                    send(stream, option, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => {
                let mut p = Payload(&data);
                let parsed = (|| {
                    let name_len = p.u32()?;
                    let name = p.string(name_len)?;
                    let count = p.u16()?;
                    let requests: Option<Vec<u16>> = (0..count).map(|_| p.u16()).collect();
                    p.is_empty().then_some((name, requests?))
                })();
                let Some((name, requests)) = parsed else {
                    send_error(stream, option, REP_ERR_INVALID, "malformed INFO/GO request")?;
                    continue;
                };
                let Some(export) = source.open(&name) else {
                    send_error(
                        stream,
                        option,
                        REP_ERR_UNKNOWN,
                        &format!("no export named {name:?}"),
                    )?;
                    continue;
                };
                if option == OPT_GO {
                    if let Err(why) = stale_contexts(&selected, &name, &*export) {
                        send_error(stream, option, REP_ERR_UNKNOWN, &why)?;
                        continue;
                    }
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size().to_be_bytes());
                info.extend_from_slice(
                    &export::transmission_flags(&*export, structured || extended).to_be_bytes(),
                );
                send(stream, option, REP_INFO, &info)?;
                if requests.contains(&INFO_NAME) {
                    let mut info = INFO_NAME.to_be_bytes().to_vec();
                    info.extend_from_slice(name.as_bytes());
                    send(stream, option, REP_INFO, &info)?;
                }
                if requests.contains(&INFO_DESCRIPTION) {
                    let mut info = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    info.extend_from_slice(export.description().as_bytes());
                    send(stream, option, REP_INFO, &info)?;
                }
                let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                info.extend_from_slice(&1u32.to_be_bytes());
                info.extend_from_slice(&export.preferred_block().to_be_bytes());
                info.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                send(stream, option, REP_INFO, &info)?;
                send(stream, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    let contexts = contexts_for(&selected, &name);
                    return Ok(Outcome::Export(Session {
                        export,
                        structured,
                        extended,
                        contexts,
                    }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set && !structured && !extended {
                    send_error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "SET_META_CONTEXT needs structured replies or extended headers first",
                    )?;
                    continue;
                }
                let mut p = Payload(&data);
                let parsed = (|| {
                    let name_len = p.u32()?;
                    let name = p.string(name_len)?;
                    let count = p.u32()?;
                    let queries: Option<Vec<String>> = (0..count)
                        .map(|_| {
                            let l = p.u32()?;
                            p.string(l)
                        })
                        .collect();
                    p.is_empty().then_some((name, queries?))
                })();
                let Some((name, queries)) = parsed else {
                    send_error(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        "malformed META_CONTEXT request",
                    )?;
                    continue;
                };
                let Some(export) = source.open(&name) else {
                    send_error(
                        stream,
                        option,
                        REP_ERR_UNKNOWN,
                        &format!("no export named {name:?}"),
                    )?;
                    continue;
                };
                let chosen: Vec<(String, Context)> = if set {
                    // Each context once, in the order first asked for: a
                    // repeated name must not select it (and its id) twice.
                    let all = export::contexts(&*export);
                    let mut chosen: Vec<(String, Context)> = Vec::new();
                    for q in &queries {
                        if chosen.iter().any(|(n, _)| n == q) {
                            continue;
                        }
                        if let Some(found) = all.iter().find(|(n, _)| n == q) {
                            chosen.push(found.clone());
                        }
                    }
                    chosen
                } else if queries.is_empty() {
                    export::contexts(&*export)
                } else {
                    queries
                        .iter()
                        .flat_map(|q| export::list_matches(&*export, q))
                        .collect()
                };
                for (context_name, context) in &chosen {
                    let mut p = if set { context.id() } else { 0 }.to_be_bytes().to_vec();
                    p.extend_from_slice(context_name.as_bytes());
                    send(stream, option, REP_META_CONTEXT, &p)?;
                }
                send(stream, option, REP_ACK, &[])?;
                if set {
                    selected = Some(Selected {
                        instance: export.instance(),
                        name,
                        contexts: chosen.into_iter().map(|(_, c)| c).collect(),
                    });
                }
            }
            _ => send_error(stream, option, REP_ERR_UNSUP, "option not supported")?,
        }
    }
}

/// Contexts chosen by SET_META_CONTEXT: for the export of that name, and
/// the instance of it (the snapshot) that was served then.
struct Selected {
    name: String,
    instance: Option<u64>,
    contexts: Vec<Context>,
}

fn contexts_for(selected: &Option<Selected>, name: &str) -> Vec<Context> {
    match selected {
        Some(s) if s.name == name => s.contexts.clone(),
        _ => Vec::new(),
    }
}

/// Refuses to open `export` with contexts selected on another instance of
/// its name: a new snapshot taken between SET_META_CONTEXT and GO would be
/// served with the old snapshot's change map, and `since-N` would miss
/// blocks changed in between.
fn stale_contexts(
    selected: &Option<Selected>,
    name: &str,
    export: &dyn Export,
) -> Result<(), String> {
    match selected {
        Some(s) if s.name == name && !s.contexts.is_empty() && s.instance != export.instance() => {
            Err(format!(
                "export {name:?} serves another snapshot than when its metadata contexts were \
                 set: set them again (NBD_OPT_SET_META_CONTEXT) before NBD_OPT_GO"
            ))
        }
        _ => Ok(()),
    }
}
