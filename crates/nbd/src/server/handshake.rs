//! The handshake phase: fixed newstyle option negotiation, up to the export the client picks
//! or NBD_OPT_STARTTLS (`tls.rs` runs the TLS handshake and calls [`options`] again). With TLS
//! required and not yet active, every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD,
//! and NBD_OPT_EXPORT_NAME, which has no error reply, ends the connection.
//!
//! [`handle_option`] answers one option into a buffer and is pure apart from the export lookup,
//! so every option's reply is written in one place and tested without sockets.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::claim::{Claim, Claims};
use super::export::{Export, ExportSet};
use super::{ConnError, Session};
use crate::proto::*;

/// Where TLS stands on one connection (the protocol doc's server modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum TlsState {
    /// NOTLS: this listener has no credentials; STARTTLS is refused.
    #[default]
    Off,
    /// FORCEDTLS before the upgrade: every option but STARTTLS and ABORT is refused.
    Required,
    /// SELECTIVETLS with no TLS-only export, before any upgrade: the client may upgrade.
    Allowed,
    /// The connection runs over TLS.
    Active,
    /// The connection runs over TLS but the client is not in the authz list: every option
    /// gets NBD_REP_ERR_POLICY with the reason.
    Denied,
}

/// Option negotiation state that options change.
#[derive(Default)]
pub(super) struct Negotiation {
    no_zeroes: bool,
    structured: bool,
    /// Export the `base:allocation` context was selected for.
    meta_for: Option<String>,
    tls: TlsState,
    /// Why the client is denied ([`TlsState::Denied`]).
    denial: String,
    /// The server's single-writer holds (none: no export is single-writer here).
    claims: Option<Arc<Claims>>,
    /// The client's certificate name, over TLS.
    identity: Option<String>,
    /// Where the client is, for messages.
    peer: String,
    /// The hold NBD_OPT_GO took on a single-writer export.
    claim: Option<Claim>,
}

impl Negotiation {
    /// The state after the greeting, or after STARTTLS (where option haggling restarts: nothing
    /// negotiated in the clear carries over).
    pub(super) fn new(no_zeroes: bool, tls: TlsState) -> Self {
        Negotiation {
            no_zeroes,
            tls,
            ..Default::default()
        }
    }

    pub(super) fn no_zeroes(&self) -> bool {
        self.no_zeroes
    }

    /// Takes single-writer holds in `claims` for the client at `peer`, known as `identity`.
    pub(super) fn with_claims(
        mut self,
        claims: Arc<Claims>,
        identity: Option<String>,
        peer: &str,
    ) -> Self {
        self.claims = Some(claims);
        self.identity = identity;
        self.peer = peer.to_string();
        self
    }

    /// Refuses every option from now on, saying `why`.
    pub(super) fn deny(&mut self, why: String) {
        self.tls = TlsState::Denied;
        self.denial = why;
    }
}

/// How the option phase ended.
pub(super) enum Step {
    /// The client picked an export.
    Transmit(Session),
    /// The client aborted politely.
    Abort,
    /// NBD_OPT_STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// Sends the greeting and reads the client's flags; returns whether the client asked for no
/// zeroes.
pub(super) async fn greet<S>(s: &mut S) -> Result<bool, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&hello).await?;
    s.flush().await?;

    let client_flags = s.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags & FLAG_C_NO_ZEROES != 0)
}

/// Answers options until the client picks an export, aborts or starts TLS.
pub(super) async fn options<S>(
    s: &mut S,
    st: &mut Negotiation,
    exports: &ExportSet,
) -> Result<Step, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(ConnError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(ConnError::Protocol(format!(
                "option {option} of {len} bytes is too large"
            )));
        }
        let mut data = BytesMut::zeroed(len as usize);
        s.read_exact(&mut data).await?;
        let data = data.freeze();
        let mut out = BytesMut::new();
        let outcome = handle_option(option, data, st, exports, &mut out);
        s.write_all(&out).await?;
        s.flush().await?;
        match outcome {
            OptionOutcome::Continue => {}
            OptionOutcome::Abort => return Ok(Step::Abort),
            OptionOutcome::StartTls => return Ok(Step::StartTls),
            OptionOutcome::Close(why) => return Err(ConnError::Protocol(why)),
            OptionOutcome::Transmit(export) => {
                let base_allocation = st.structured && st.meta_for.as_deref() == Some(&export.name);
                return Ok(Step::Transmit(Session {
                    export,
                    structured: st.structured,
                    base_allocation,
                    claim: st.claim.take(),
                }));
            }
        }
    }
}

enum OptionOutcome {
    Continue,
    Abort,
    StartTls,
    Close(String),
    Transmit(Arc<Export>),
}

fn error_reply(out: &mut BytesMut, option: u32, kind: u32, msg: &str) -> OptionOutcome {
    option_reply(out, option, kind, msg.as_bytes());
    OptionOutcome::Continue
}

/// Answers one option into `out`. Pure apart from the export lookup: the fuzz target drives it.
fn handle_option(
    option: u32,
    data: Bytes,
    st: &mut Negotiation,
    exports: &ExportSet,
    out: &mut BytesMut,
) -> OptionOutcome {
    if option == OPT_STARTTLS {
        return starttls(&data, st, out);
    }
    if st.tls == TlsState::Denied && option != OPT_ABORT {
        if option == OPT_EXPORT_NAME {
            return OptionOutcome::Close(st.denial.clone());
        }
        return error_reply(out, option, REP_ERR_POLICY, &st.denial);
    }
    if st.tls == TlsState::Required && option != OPT_ABORT {
        if option == OPT_EXPORT_NAME {
            // It has no error reply: the protocol says to end the session.
            return OptionOutcome::Close(
                "NBD_OPT_EXPORT_NAME before STARTTLS: TLS is required".into(),
            );
        }
        return error_reply(
            out,
            option,
            REP_ERR_TLS_REQD,
            "TLS is required: send NBD_OPT_STARTTLS first",
        );
    }
    match option {
        OPT_EXPORT_NAME => {
            let Ok(name) = std::str::from_utf8(&data) else {
                return OptionOutcome::Close("export name is not UTF-8".into());
            };
            // This option has no error reply: an unknown export ends the session.
            let Some(export) = exports.get(name) else {
                return OptionOutcome::Close(format!("unknown export '{name}'"));
            };
            out.put_u64(export.dev.len());
            out.put_u16(export.transmission_flags());
            if !st.no_zeroes {
                out.put_bytes(0, 124);
            }
            OptionOutcome::Transmit(export)
        }
        OPT_ABORT => {
            option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Abort
        }
        OPT_LIST => {
            if !data.is_empty() {
                return error_reply(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
            }
            for e in exports.list() {
                let mut d = BytesMut::new();
                d.put_u32(e.name.len() as u32);
                d.put_slice(e.name.as_bytes());
                d.put_slice(e.description.as_bytes());
                option_reply(out, option, REP_SERVER, &d);
            }
            option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Continue
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return error_reply(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                );
            }
            st.structured = true;
            option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Continue
        }
        OPT_INFO | OPT_GO => match parse_for_export(option, data, None, exports, out) {
            Ok((req, export)) => info_or_go(option, &req, export, st, out),
            Err(refused) => refused,
        },
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let refusal = (option == OPT_SET_META_CONTEXT && !st.structured)
                .then_some("structured replies must be negotiated first");
            match parse_for_export(option, data, refusal, exports, out) {
                Ok((req, export)) => meta_context(option, &req, &export, st, out),
                Err(refused) => refused,
            }
        }
        _ => error_reply(
            out,
            option,
            REP_ERR_UNSUP,
            &format!("option {option} is not supported"),
        ),
    }
}

/// Answers NBD_OPT_STARTTLS as the protocol doc's server modes say.
fn starttls(data: &[u8], st: &Negotiation, out: &mut BytesMut) -> OptionOutcome {
    let refusal = match st.tls {
        TlsState::Off => Some((
            REP_ERR_POLICY,
            "TLS is not configured on this listener (the daemon has no --tls-creds)",
        )),
        TlsState::Active | TlsState::Denied => Some((REP_ERR_INVALID, "TLS is already active")),
        _ if !data.is_empty() => Some((REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")),
        _ => None,
    };
    match refusal {
        Some((kind, why)) => error_reply(out, OPT_STARTTLS, kind, why),
        None => {
            option_reply(out, OPT_STARTTLS, REP_ACK, &[]);
            OptionOutcome::StartTls
        }
    }
}

/// An option payload that names an export (NBD_OPT_INFO/GO, NBD_OPT_*_META_CONTEXT).
trait ExportOption: Sized {
    fn parse(data: Bytes) -> Result<Self, OptionError>;
    fn export_name(&self) -> &str;
}

impl ExportOption for InfoRequest {
    fn parse(data: Bytes) -> Result<Self, OptionError> {
        InfoRequest::parse(data)
    }
    fn export_name(&self) -> &str {
        &self.name
    }
}

impl ExportOption for MetaContextRequest {
    fn parse(data: Bytes) -> Result<Self, OptionError> {
        MetaContextRequest::parse(data)
    }
    fn export_name(&self) -> &str {
        &self.name
    }
}

/// The start every option that names an export shares, in the order clients see it: a
/// malformed payload gets NBD_REP_ERR_INVALID, then `refusal` (an option not allowed yet) gets
/// NBD_REP_ERR_INVALID with its reason, then an unknown export gets NBD_REP_ERR_UNKNOWN. `Err`
/// is the outcome once that error reply is in `out`.
fn parse_for_export<T: ExportOption>(
    option: u32,
    data: Bytes,
    refusal: Option<&str>,
    exports: &ExportSet,
    out: &mut BytesMut,
) -> Result<(T, Arc<Export>), OptionOutcome> {
    let req = match T::parse(data) {
        Ok(r) => r,
        Err(e) => return Err(error_reply(out, option, REP_ERR_INVALID, &e.to_string())),
    };
    if let Some(why) = refusal {
        return Err(error_reply(out, option, REP_ERR_INVALID, why));
    }
    let name = req.export_name();
    match exports.get(name) {
        Some(export) => Ok((req, export)),
        None => Err(error_reply(
            out,
            option,
            REP_ERR_UNKNOWN,
            &format!("unknown export '{name}'"),
        )),
    }
}

/// Answers NBD_OPT_INFO or NBD_OPT_GO about a known export.
fn info_or_go(
    option: u32,
    req: &InfoRequest,
    export: Arc<Export>,
    st: &mut Negotiation,
    out: &mut BytesMut,
) -> OptionOutcome {
    if option == OPT_GO
        && export.single_writer
        && let Some(claims) = &st.claims
    {
        match claims.claim(&export.name, st.identity.as_deref(), &st.peer) {
            Ok(claim) => st.claim = Some(claim),
            Err(why) => return error_reply(out, option, REP_ERR_POLICY, &why),
        }
    }
    let mut info = |kind: u16, body: &dyn Fn(&mut BytesMut)| {
        let mut d = BytesMut::new();
        d.put_u16(kind);
        body(&mut d);
        option_reply(out, option, REP_INFO, &d);
    };
    info(INFO_EXPORT, &|d| {
        d.put_u64(export.dev.len());
        d.put_u16(export.transmission_flags());
    });
    if req.infos.contains(&INFO_NAME) {
        info(INFO_NAME, &|d| d.put_slice(export.name.as_bytes()));
    }
    if req.infos.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        info(INFO_DESCRIPTION, &|d| {
            d.put_slice(export.description.as_bytes())
        });
    }
    let sizes = export.dev.info();
    info(INFO_BLOCK_SIZE, &|d| {
        d.put_u32(sizes.min_block.max(1));
        d.put_u32(sizes.preferred_block.max(sizes.min_block).max(512));
        d.put_u32(sizes.max_request.min(MAX_PAYLOAD));
    });
    option_reply(out, option, REP_ACK, &[]);
    if option == OPT_GO {
        // A context selected for another export does not carry over.
        if st.meta_for.as_deref() != Some(&export.name) {
            st.meta_for = None;
        }
        OptionOutcome::Transmit(export)
    } else {
        OptionOutcome::Continue
    }
}

/// Answers NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT about a known export.
fn meta_context(
    option: u32,
    req: &MetaContextRequest,
    export: &Export,
    st: &mut Negotiation,
    out: &mut BytesMut,
) -> OptionOutcome {
    let list_all = option == OPT_LIST_META_CONTEXT && req.queries.is_empty();
    let selected = list_all || req.queries.iter().any(|q| query_matches_base_allocation(q));
    if selected {
        let mut d = BytesMut::new();
        d.put_u32(BASE_ALLOCATION_ID);
        d.put_slice(BASE_ALLOCATION.as_bytes());
        option_reply(out, option, REP_META_CONTEXT, &d);
    }
    if option == OPT_SET_META_CONTEXT {
        st.meta_for = selected.then(|| export.name.clone());
    }
    option_reply(out, option, REP_ACK, &[]);
    OptionOutcome::Continue
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemoryDev;

    fn exports() -> ExportSet {
        let set = ExportSet::new();
        set.add(Export::new("disk", Arc::new(MemoryDev::new(1 << 20))));
        set
    }

    #[test]
    fn go_for_unknown_export_replies_err_unknown_and_goes_on() {
        let mut st = Negotiation::default();
        let mut data = BytesMut::new();
        InfoRequest {
            name: "nope".into(),
            infos: vec![],
        }
        .encode(&mut data);
        let mut out = BytesMut::new();
        let o = handle_option(OPT_GO, data.freeze(), &mut st, &exports(), &mut out);
        assert!(matches!(o, OptionOutcome::Continue));
        assert_eq!(&out[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&out[12..16], &REP_ERR_UNKNOWN.to_be_bytes());
    }

    /// Answers one option in a fresh negotiation; returns the outcome and the first reply's type.
    fn answer(option: u32, data: Bytes) -> (OptionOutcome, u32) {
        let mut out = BytesMut::new();
        let o = handle_option(
            option,
            data,
            &mut Negotiation::default(),
            &exports(),
            &mut out,
        );
        (o, u32::from_be_bytes(out[12..16].try_into().unwrap()))
    }

    #[test]
    fn options_naming_an_export_refuse_a_malformed_payload_before_the_lookup() {
        for option in [
            OPT_INFO,
            OPT_GO,
            OPT_LIST_META_CONTEXT,
            OPT_SET_META_CONTEXT,
        ] {
            let (o, kind) = answer(option, Bytes::from_static(&[0, 0, 0, 9, b'x']));
            assert!(matches!(o, OptionOutcome::Continue));
            assert_eq!(kind, REP_ERR_INVALID, "option {option}");
        }
    }

    #[test]
    fn list_meta_context_for_unknown_export_replies_err_unknown() {
        let mut data = BytesMut::new();
        let queries = vec![];
        MetaContextRequest {
            name: "nope".into(),
            queries,
        }
        .encode(&mut data);
        let (o, kind) = answer(OPT_LIST_META_CONTEXT, data.freeze());
        assert!(matches!(o, OptionOutcome::Continue));
        assert_eq!(kind, REP_ERR_UNKNOWN);
    }

    #[test]
    fn set_meta_context_needs_structured_replies() {
        let mut st = Negotiation::default();
        let mut data = BytesMut::new();
        MetaContextRequest {
            name: "disk".into(),
            queries: vec![BASE_ALLOCATION.into()],
        }
        .encode(&mut data);
        let mut out = BytesMut::new();
        handle_option(
            OPT_SET_META_CONTEXT,
            data.clone().freeze(),
            &mut st,
            &exports(),
            &mut out,
        );
        assert_eq!(&out[12..16], &REP_ERR_INVALID.to_be_bytes());
        st.structured = true;
        out.clear();
        handle_option(
            OPT_SET_META_CONTEXT,
            data.freeze(),
            &mut st,
            &exports(),
            &mut out,
        );
        assert_eq!(&out[12..16], &REP_META_CONTEXT.to_be_bytes());
        assert_eq!(st.meta_for.as_deref(), Some("disk"));
    }

    /// Answers `option` (empty payload) in state `tls`; returns the outcome and the reply type.
    fn answer_in(tls: TlsState, option: u32) -> (OptionOutcome, Option<u32>) {
        let mut out = BytesMut::new();
        let mut st = Negotiation::new(false, tls);
        let o = handle_option(option, Bytes::new(), &mut st, &exports(), &mut out);
        let kind = (out.len() >= 16).then(|| u32::from_be_bytes(out[12..16].try_into().unwrap()));
        (o, kind)
    }

    #[test]
    fn tls_required_refuses_every_option_but_starttls_and_abort() {
        for option in [OPT_LIST, OPT_GO, OPT_INFO, OPT_STRUCTURED_REPLY, 99] {
            let (o, kind) = answer_in(TlsState::Required, option);
            assert!(matches!(o, OptionOutcome::Continue), "option {option}");
            assert_eq!(kind, Some(REP_ERR_TLS_REQD), "option {option}");
        }
        let (o, kind) = answer_in(TlsState::Required, OPT_EXPORT_NAME);
        assert!(matches!(o, OptionOutcome::Close(_)));
        assert_eq!(kind, None, "NBD_OPT_EXPORT_NAME has no reply");
        let (o, kind) = answer_in(TlsState::Required, OPT_STARTTLS);
        assert!(matches!(o, OptionOutcome::StartTls));
        assert_eq!(kind, Some(REP_ACK));
        let (o, kind) = answer_in(TlsState::Required, OPT_ABORT);
        assert!(matches!(o, OptionOutcome::Abort));
        assert_eq!(kind, Some(REP_ACK));
    }

    #[test]
    fn starttls_is_refused_without_credentials_once_active_and_with_data() {
        assert_eq!(
            answer_in(TlsState::Off, OPT_STARTTLS).1,
            Some(REP_ERR_POLICY)
        );
        assert_eq!(
            answer_in(TlsState::Active, OPT_STARTTLS).1,
            Some(REP_ERR_INVALID)
        );
        let mut out = BytesMut::new();
        let mut st = Negotiation::new(false, TlsState::Allowed);
        let o = handle_option(
            OPT_STARTTLS,
            Bytes::from_static(b"x"),
            &mut st,
            &exports(),
            &mut out,
        );
        assert!(matches!(o, OptionOutcome::Continue));
        assert_eq!(&out[12..16], &REP_ERR_INVALID.to_be_bytes());
    }

    #[test]
    fn a_denied_client_gets_the_reason_for_every_option() {
        let mut st = Negotiation::new(false, TlsState::Active);
        st.deny("client 'CN=x' is not in the TLS authz list".into());
        for option in [OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY] {
            let mut out = BytesMut::new();
            let o = handle_option(option, Bytes::new(), &mut st, &exports(), &mut out);
            assert!(matches!(o, OptionOutcome::Continue));
            assert_eq!(&out[12..16], &REP_ERR_POLICY.to_be_bytes());
            assert_eq!(&out[20..], b"client 'CN=x' is not in the TLS authz list");
        }
        let mut out = BytesMut::new();
        let o = handle_option(
            OPT_EXPORT_NAME,
            Bytes::from_static(b"disk"),
            &mut st,
            &exports(),
            &mut out,
        );
        assert!(matches!(o, OptionOutcome::Close(_)));
        assert!(out.is_empty());
    }

    #[test]
    fn tls_allowed_and_active_answer_options_as_usual() {
        for tls in [TlsState::Allowed, TlsState::Active] {
            let (o, kind) = answer_in(tls, OPT_LIST);
            assert!(matches!(o, OptionOutcome::Continue));
            assert_eq!(kind, Some(REP_SERVER), "{tls:?}");
        }
        assert_eq!(answer_in(TlsState::Allowed, OPT_STARTTLS).1, Some(REP_ACK));
    }
}
