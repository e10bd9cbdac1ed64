//! Frame codec (wire-protocol.md §2, §10): the byte-exact vectors of `vectors.txt`, then one test
//! per codec rule.

use std::path::PathBuf;

use nowconnect_core::frame::{
    decode_message, decode_one, truncate_utf8, valid_connector, Decoder, FinDir, FrameType,
    DEFAULT_MAX_FRAME, HEADER_LEN, MAX_CONNECTOR, MAX_JSON_BODY, MAX_PEER, MAX_REASON, MAX_TOKEN,
};
use nowconnect_core::{
    BackendHealth, ConnectorHealth, DecodeError, Frame, HealthReport, Hello, HelloAck, Rejected,
    RenewAck, Side,
};

const HUB: Side = Side::Hub;
const AGENT: Side = Side::Agent;

// ----- helpers -----

/// A frame's bytes from its parts, whatever they say (for malformed cases).
fn raw(ty: u8, cid: u32, body: &[u8]) -> Vec<u8> {
    raw_len(ty, cid, body.len() as u32, body)
}

/// A header declaring `len`, followed by `body` (which may be shorter or longer).
fn raw_len(ty: u8, cid: u32, len: u32, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&cid.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn enc(f: &Frame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

fn dec(msg: &[u8], sender: Side) -> Result<Vec<Frame<'_>>, DecodeError> {
    decode_message(msg, sender, DEFAULT_MAX_FRAME)
}

/// The error decoding `msg` must give, checked through both entry points.
#[track_caller]
fn err(msg: &[u8], sender: Side) -> DecodeError {
    let e = match dec(msg, sender) {
        Ok(frames) => panic!("decoded {frames:?}, expected an error"),
        Err(e) => e,
    };
    let last = Decoder::new(msg, sender, DEFAULT_MAX_FRAME).last();
    assert_eq!(last, Some(Err(e)), "Decoder and decode_message disagree");
    e
}

#[track_caller]
fn one(msg: &[u8], sender: Side) -> Frame<'_> {
    let mut frames = dec(msg, sender).unwrap_or_else(|e| panic!("decode failed: {e:?}"));
    assert_eq!(frames.len(), 1);
    frames.remove(0)
}

fn hello() -> Hello {
    Hello {
        agent_id: "dc1-agent-01".into(),
        connectors: vec!["ldap".into(), "ldaps".into()],
        ver: 1,
        software: "nowconnect-agent/0.1.0".into(),
        window: 262_144,
        max_streams: 10_000,
    }
}

fn hello_ack() -> HelloAck {
    HelloAck {
        session: "s-1".into(),
        accepted: vec!["ldap".into()],
        rejected: vec![Rejected {
            connector: "ldaps".into(),
            reason: "not in token scope".into(),
        }],
        window: 262_144,
        max_frame: 65_536,
        heartbeat_ms: 20_000,
        ver: 1,
    }
}

fn health() -> HealthReport {
    let mut h = HealthReport::default();
    h.connectors.insert(
        "ldap".into(),
        ConnectorHealth {
            healthy: true,
            backends: vec![
                BackendHealth {
                    addr: "dc1:389".into(),
                    ok: true,
                    rtt_ms: Some(2),
                    error: None,
                },
                BackendHealth {
                    addr: "dc2:389".into(),
                    ok: false,
                    rtt_ms: None,
                    error: Some("connection refused".into()),
                },
            ],
        },
    );
    h
}

// ----- vectors.txt -----

struct Vector {
    line: usize,
    valid: bool,
    sender: Side,
    bytes: Vec<u8>,
    desc: String,
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// The committed copy, so the test runs wherever the repo is cloned.
fn vectors_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors.txt")
}

fn vectors() -> Vec<Vector> {
    let text = std::fs::read_to_string(vectors_path()).expect("read core/tests/vectors.txt");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (data, desc) = line.split_once('#').unwrap_or((line, ""));
        let mut f = data.split_whitespace();
        let (Some(kind), Some(sender), Some(h), None) = (f.next(), f.next(), f.next(), f.next())
        else {
            panic!("vectors.txt:{line_no}: not `valid|invalid SENDER HEX # desc`");
        };
        out.push(Vector {
            line: line_no,
            valid: match kind {
                "valid" => true,
                "invalid" => false,
                k => panic!("vectors.txt:{line_no}: bad kind {k}"),
            },
            sender: match sender {
                "hub" => HUB,
                "agent" => AGENT,
                s => panic!("vectors.txt:{line_no}: bad sender {s}"),
            },
            bytes: hex(h),
            desc: desc.trim().to_owned(),
        });
    }
    out
}

/// The copy in core/tests equals the spec's file whenever shared/ sits beside the repo.
#[test]
fn vectors_copy_matches_spec() {
    let spec = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/spec/vectors.txt");
    let Ok(spec) = std::fs::read(&spec) else {
        eprintln!("shared/spec/vectors.txt not beside the repo: comparing skipped");
        return;
    };
    let copy = std::fs::read(vectors_path()).expect("read core/tests/vectors.txt");
    assert!(
        copy == spec,
        "core/tests/vectors.txt differs from shared/spec/vectors.txt: copy it again"
    );
}

fn json_value(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).expect("JSON body")
}

#[test]
fn valid_vectors_decode_and_reencode() {
    let vs = vectors();
    let mut n = 0;
    for v in vs.iter().filter(|v| v.valid) {
        n += 1;
        let at = format!("vectors.txt:{} ({})", v.line, v.desc);
        let mut rest = &v.bytes[..];
        let mut count = 0;
        while !rest.is_empty() {
            let (frame, used) = decode_one(rest, v.sender, DEFAULT_MAX_FRAME)
                .unwrap_or_else(|e| panic!("{at}: {e:?}"));
            let original = &rest[..used];
            let again = enc(&frame);
            match frame {
                Frame::Hello(_) | Frame::HelloAck(_) | Frame::Health(_) | Frame::RenewAck(_) => {
                    assert_eq!(
                        json_value(&again[HEADER_LEN..]),
                        json_value(&original[HEADER_LEN..]),
                        "{at}: JSON not equivalent"
                    );
                    assert_eq!(again[..5], original[..5], "{at}: type/cid");
                }
                _ => assert_eq!(again, original, "{at}: not byte-identical"),
            }
            rest = &rest[used..];
            count += 1;
        }
        assert!(count >= 1, "{at}: no frame");
        assert_eq!(dec(&v.bytes, v.sender).map(|f| f.len()), Ok(count), "{at}");
    }
    assert!(n >= 18, "only {n} valid vectors");
}

/// What each invalid vector's description says must be rejected, and with which kind. A new
/// vector with a description not listed here fails the test until it is added.
const INVALID_KINDS: &[(&str, &str)] = &[
    ("unknown type", "unknown_type"),
    ("partial frame", "partial_frame"),
    ("truncated header", "partial_frame"),
    ("trailing partial", "partial_frame"),
    ("stream frame on cid 0", "wrong_cid_class"),
    ("session frame on cid", "wrong_cid_class"),
    ("wrong direction", "wrong_direction"),
    ("FIN dir", "fin_dir_mismatch"),
    ("WINDOW increment 0", "window_zero"),
    ("WINDOW body 3", "body_too_short"),
    ("PING body 7", "body_too_short"),
    ("empty DATA", "empty_data"),
    ("over max_frame", "body_too_long"),
    ("not JSON", "bad_json"),
    ("JSON array", "bad_json"),
    ("bad character", "bad_connector"),
    // §10: OPEN's minimum is 3 bytes (a connector is at least 1), so `0000` is too short.
    ("connector empty", "body_too_short"),
    ("not UTF-8", "bad_utf8"),
    ("over 256", "body_too_long"),
    ("0xFFFFFFF0", "body_too_long"),
    ("over 64 KiB", "body_too_long"),
];

#[test]
fn invalid_vectors_fail_with_their_kind() {
    let vs = vectors();
    let mut n = 0;
    for v in vs.iter().filter(|v| !v.valid) {
        n += 1;
        let at = format!("vectors.txt:{} ({})", v.line, v.desc);
        let matching: Vec<&str> = INVALID_KINDS
            .iter()
            .filter(|(k, _)| v.desc.contains(k))
            .map(|(_, kind)| *kind)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{at}: expected kind unknown or ambiguous"
        );
        let e = dec(&v.bytes, v.sender).expect_err(&at);
        assert_eq!(e.kind(), matching[0], "{at}: got {e:?}");
    }
    assert!(n >= 22, "only {n} invalid vectors");
}

// ----- round trips -----

fn all_frames<'a>(payload: &'a [u8]) -> Vec<(Frame<'a>, &'static [Side])> {
    const BOTH: &[Side] = &[HUB, AGENT];
    vec![
        (Frame::Hello(hello()), &[AGENT]),
        (Frame::HelloAck(hello_ack()), &[HUB]),
        (
            Frame::Open {
                cid: 1,
                connector: "ldap",
                peer: "10.1.2.3:51234",
            },
            &[HUB],
        ),
        (
            Frame::OpenOk {
                cid: 7,
                backend: "dc1.corp.local:389",
            },
            &[AGENT],
        ),
        (
            Frame::Data {
                cid: u32::MAX,
                seq: 5,
                payload,
            },
            BOTH,
        ),
        (
            Frame::Window {
                cid: 2,
                increment: u32::MAX,
            },
            BOTH,
        ),
        (
            Frame::Fin {
                cid: 1,
                dir: FinDir::C2a,
            },
            &[HUB],
        ),
        (
            Frame::Fin {
                cid: 1,
                dir: FinDir::A2c,
            },
            &[AGENT],
        ),
        (
            Frame::Rst {
                cid: 3,
                code: 3,
                reason: "connection refused",
            },
            BOTH,
        ),
        (Frame::Ping { opaque: u64::MAX }, BOTH),
        (Frame::Pong { opaque: 0x0102 }, BOTH),
        (Frame::Health(health()), &[AGENT]),
        (
            Frame::GoAway {
                code: 11,
                last_cid: 41,
                reason: "hub shutting down",
            },
            BOTH,
        ),
        (
            Frame::Renew {
                token: "eyJhbGciOi.eyJzdWIi.c2ln",
            },
            &[AGENT],
        ),
        (Frame::RenewAck(RenewAck { exp: 1_800_000_000 }), &[HUB]),
    ]
}

#[test]
fn every_frame_type_round_trips() {
    let payload = b"hello";
    let frames = all_frames(payload);
    let mut types: Vec<u8> = frames.iter().map(|(f, _)| f.frame_type() as u8).collect();
    types.dedup();
    assert_eq!(
        types,
        (1..=14).collect::<Vec<u8>>(),
        "all 14 types, in order"
    );
    for (frame, senders) in &frames {
        let bytes = enc(frame);
        assert_eq!(bytes.len(), frame.encoded_len(), "{frame:?}");
        assert_eq!(FrameType::from_u8(bytes[0]), Some(frame.frame_type()));
        for &sender in *senders {
            let (back, used) = decode_one(&bytes, sender, DEFAULT_MAX_FRAME)
                .unwrap_or_else(|e| panic!("{frame:?} from {sender:?}: {e:?}"));
            assert_eq!(used, bytes.len());
            assert_eq!(&back, frame);
            assert_eq!(back.cid(), frame.cid());
            assert_eq!(enc(&back), bytes, "re-encode of {frame:?}");
        }
    }
}

#[test]
fn several_frames_in_one_message_decode_in_order() {
    let payload = [0xAB; 100];
    let mut msg = Vec::new();
    let hub_frames: Vec<Frame<'_>> = all_frames(&payload)
        .into_iter()
        .filter(|(_, s)| s.contains(&HUB))
        .map(|(f, _)| f)
        .collect();
    for f in &hub_frames {
        f.encode(&mut msg);
    }
    assert_eq!(dec(&msg, HUB), Ok(hub_frames));
}

#[test]
fn data_payload_is_borrowed_from_the_message() {
    let msg = enc(&Frame::Data {
        cid: 1,
        seq: 0,
        payload: b"zero copy",
    });
    let Frame::Data { payload, .. } = one(&msg, HUB) else {
        panic!("not DATA");
    };
    assert_eq!(payload, b"zero copy");
    assert_eq!(
        payload.as_ptr(),
        msg[HEADER_LEN + 4..].as_ptr(),
        "payload copied"
    );
    // Strings too.
    let msg = enc(&Frame::Rst {
        cid: 1,
        code: 0,
        reason: "why",
    });
    let Frame::Rst { reason, .. } = one(&msg, AGENT) else {
        panic!("not RST");
    };
    assert!(
        msg.as_ptr_range().contains(&reason.as_ptr()),
        "reason copied"
    );
}

#[test]
fn data_payload_limit_is_max_frame() {
    for max_frame in [1u32, 16, DEFAULT_MAX_FRAME] {
        let fits = vec![1u8; max_frame as usize];
        let over = vec![1u8; max_frame as usize + 1];
        let ok = enc(&Frame::Data {
            cid: 1,
            seq: 0,
            payload: &fits,
        });
        let bad = enc(&Frame::Data {
            cid: 1,
            seq: 0,
            payload: &over,
        });
        assert!(decode_message(&ok, HUB, max_frame).is_ok(), "{max_frame}");
        assert_eq!(
            decode_message(&bad, HUB, max_frame),
            Err(DecodeError::BodyTooLong),
            "{max_frame}"
        );
        // Rejected from the header alone, before the body is even there.
        assert_eq!(
            decode_message(&bad[..HEADER_LEN], HUB, max_frame),
            Err(DecodeError::BodyTooLong)
        );
    }
}

#[test]
fn json_bodies_up_to_64_kib() {
    let mut body = serde_json::to_vec(&hello()).expect("serialize");
    body.resize(MAX_JSON_BODY, b' ');
    let ok = raw(0x01, 0, &body);
    assert_eq!(one(&ok, AGENT), Frame::Hello(hello()));
    body.push(b' ');
    for ty in [0x01u8, 0x0B] {
        assert_eq!(err(&raw(ty, 0, &body), AGENT), DecodeError::BodyTooLong);
    }
    for ty in [0x02u8, 0x0E] {
        assert_eq!(err(&raw(ty, 0, &body), HUB), DecodeError::BodyTooLong);
    }
    // Minimum 2 bytes (`{}`).
    assert_eq!(err(&raw(0x0E, 0, b"7"), HUB), DecodeError::BodyTooShort);
}

#[test]
fn json_fields_are_checked() {
    let cases: &[&[u8]] = &[
        br#"{"connectors":["ldap"]}"#,                      // no agent_id
        br#"{"agent_id":"a"}"#,                             // no connectors
        br#"{"agent_id":"a","connectors":"ldap"}"#,         // connectors not an array
        br#"{"agent_id":"a","connectors":[1]}"#,            // connector not a string
        br#"{"agent_id":7,"connectors":["ldap"]}"#,         // agent_id not a string
        br#"{"agent_id":"a","connectors":[],"window":-1}"#, // negative window
        br#"{"agent_id":"a","connectors":[]"#,              // truncated
        br#"[]"#,                                           // not an object
        b"\xff\xfe",                                        // not UTF-8
    ];
    for body in cases {
        let msg = raw(0x01, 0, body);
        assert_eq!(
            err(&msg, AGENT),
            DecodeError::BadJson,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    // Unknown fields are ignored; missing optional ones take their defaults (§3).
    let msg = raw(
        0x01,
        0,
        br#"{"agent_id":"a","connectors":["x"],"future":{"k":[1]}}"#,
    );
    let Frame::Hello(h) = one(&msg, AGENT) else {
        panic!("not HELLO");
    };
    assert_eq!((h.agent_id.as_str(), h.ver, h.window), ("a", 1, 262_144));
    // HELLO_ACK needs session and accepted; RENEW_ACK needs a non-negative integer exp.
    for (ty, body) in [
        (0x02u8, &br#"{"accepted":["ldap"]}"#[..]),
        (0x02, br#"{"session":"s","accepted":"ldap"}"#),
        (0x0E, br#"{}"#),
        (0x0E, br#"{"exp":-5}"#),
        (0x0E, br#"{"exp":"soon"}"#),
    ] {
        assert_eq!(err(&raw(ty, 0, body), HUB), DecodeError::BadJson);
    }
    // HEALTH's connectors is a map of objects.
    for body in [
        &br#"{"connectors":[]}"#[..],
        br#"{"connectors":{"ldap":{}}}"#,
    ] {
        assert_eq!(err(&raw(0x0B, 0, body), AGENT), DecodeError::BadJson);
    }
}

// ----- malformed frames, one rule each -----

#[test]
fn unknown_type() {
    for ty in [0x00u8, 0x0F, 0x10, 0x80, 0xFF] {
        let e = err(&raw(ty, 0, &[0; 8]), HUB);
        assert_eq!(e, DecodeError::UnknownType(ty));
        assert_eq!(e.kind(), "unknown_type");
        assert_eq!(e.to_string(), format!("unknown frame type 0x{ty:02x}"));
    }
}

#[test]
fn partial_header() {
    let frame = enc(&Frame::Ping { opaque: 1 });
    for n in 1..HEADER_LEN {
        assert_eq!(
            err(&frame[..n], AGENT),
            DecodeError::PartialFrame,
            "{n} bytes"
        );
    }
}

#[test]
fn partial_body() {
    let frame = enc(&Frame::Ping { opaque: 1 });
    for n in HEADER_LEN..frame.len() {
        assert_eq!(
            err(&frame[..n], AGENT),
            DecodeError::PartialFrame,
            "{n} bytes"
        );
    }
    let frame = enc(&Frame::Data {
        cid: 1,
        seq: 0,
        payload: b"abc",
    });
    assert_eq!(
        err(&frame[..frame.len() - 1], AGENT),
        DecodeError::PartialFrame
    );
}

#[test]
fn trailing_partial_frame() {
    let mut msg = enc(&Frame::Pong { opaque: 1 });
    let whole = msg.len();
    msg.extend_from_slice(&enc(&Frame::Ping { opaque: 2 })[..5]);
    assert_eq!(err(&msg, AGENT), DecodeError::PartialFrame);
    // The Decoder yields the good frame, then the error once, then stops.
    let mut d = Decoder::new(&msg, AGENT, DEFAULT_MAX_FRAME);
    assert_eq!(d.next(), Some(Ok(Frame::Pong { opaque: 1 })));
    assert_eq!(d.next(), Some(Err(DecodeError::PartialFrame)));
    assert_eq!(d.next(), None);
    // A whole frame followed by any stray byte is an error too.
    msg.truncate(whole + 1);
    assert_eq!(err(&msg, AGENT), DecodeError::PartialFrame);
}

#[test]
fn empty_message() {
    assert_eq!(dec(&[], HUB), Err(DecodeError::EmptyMessage));
    assert_eq!(DecodeError::EmptyMessage.kind(), "empty_message");
    assert_eq!(Decoder::new(&[], HUB, DEFAULT_MAX_FRAME).next(), None);
}

/// A valid body for each type, sent by `sender` (for the cid and direction rules).
fn body_of(ty: u8) -> Vec<u8> {
    let f = match ty {
        0x01 => Frame::Hello(hello()),
        0x02 => Frame::HelloAck(hello_ack()),
        0x03 => Frame::Open {
            cid: 1,
            connector: "ldap",
            peer: "",
        },
        0x04 => Frame::OpenOk {
            cid: 1,
            backend: "",
        },
        0x05 => Frame::Data {
            cid: 1,
            seq: 0,
            payload: b"x",
        },
        0x06 => Frame::Window {
            cid: 1,
            increment: 1,
        },
        0x07 => Frame::Fin {
            cid: 1,
            dir: FinDir::C2a,
        },
        0x08 => Frame::Rst {
            cid: 1,
            code: 0,
            reason: "",
        },
        0x09 => Frame::Ping { opaque: 0 },
        0x0A => Frame::Pong { opaque: 0 },
        0x0B => Frame::Health(health()),
        0x0C => Frame::GoAway {
            code: 0,
            last_cid: 0,
            reason: "",
        },
        0x0D => Frame::Renew { token: "t" },
        0x0E => Frame::RenewAck(RenewAck { exp: 1 }),
        _ => unreachable!(),
    };
    enc(&f)[HEADER_LEN..].to_vec()
}

/// A side allowed to send `ty` (the hub for both-way types).
fn allowed_sender(ty: FrameType) -> Side {
    ty.sender().unwrap_or(HUB)
}

#[test]
fn stream_frame_on_cid_0_and_session_frame_on_stream_cid() {
    for ty in 1..=14u8 {
        let t = FrameType::from_u8(ty).expect("known type");
        let sender = allowed_sender(t);
        let body = body_of(ty);
        if t.is_stream() {
            assert_eq!(
                err(&raw(ty, 0, &body), sender),
                DecodeError::WrongCidClass,
                "{t:?}"
            );
            assert!(dec(&raw(ty, 1, &body), sender).is_ok(), "{t:?}");
        } else {
            for cid in [1, u32::MAX] {
                assert_eq!(
                    err(&raw(ty, cid, &body), sender),
                    DecodeError::WrongCidClass
                );
            }
            assert!(dec(&raw(ty, 0, &body), sender).is_ok(), "{t:?}");
        }
    }
}

#[test]
fn wrong_direction_for_each_directional_type() {
    let mut directional = 0;
    for ty in 1..=14u8 {
        let t = FrameType::from_u8(ty).expect("known type");
        let cid = u32::from(t.is_stream());
        let body = body_of(ty);
        match t.sender() {
            Some(sender) => {
                directional += 1;
                let msg = raw(ty, cid, &body);
                assert_eq!(
                    err(&msg, sender.peer()),
                    DecodeError::WrongDirection,
                    "{t:?}"
                );
                assert!(dec(&msg, sender).is_ok(), "{t:?}");
            }
            None if t != FrameType::Fin => {
                for sender in [HUB, AGENT] {
                    assert!(dec(&raw(ty, cid, &body), sender).is_ok(), "{t:?}");
                }
            }
            None => {}
        }
    }
    assert_eq!(
        directional, 7,
        "HELLO HELLO_ACK OPEN OPEN_OK HEALTH RENEW RENEW_ACK"
    );
}

#[test]
fn fin_dir_must_match_its_sender() {
    assert_eq!(FinDir::of_sender(HUB), FinDir::C2a);
    assert_eq!(FinDir::of_sender(AGENT), FinDir::A2c);
    assert_eq!(err(&raw(0x07, 1, &[1]), HUB), DecodeError::FinDirMismatch);
    assert_eq!(err(&raw(0x07, 1, &[0]), AGENT), DecodeError::FinDirMismatch);
    for dir in [2u8, 0xFF] {
        for sender in [HUB, AGENT] {
            assert_eq!(
                err(&raw(0x07, 1, &[dir]), sender),
                DecodeError::FinDirMismatch
            );
        }
    }
    assert_eq!(err(&raw(0x07, 1, &[]), HUB), DecodeError::BodyTooShort);
    assert_eq!(err(&raw(0x07, 1, &[0, 0]), HUB), DecodeError::BodyTooLong);
}

#[test]
fn window_rules() {
    assert_eq!(err(&raw(0x06, 1, &[0; 4]), HUB), DecodeError::WindowZero);
    assert_eq!(
        err(&raw(0x06, 1, &[0, 0, 1]), HUB),
        DecodeError::BodyTooShort
    );
    assert_eq!(
        err(&raw(0x06, 1, &[0, 0, 0, 0, 1]), HUB),
        DecodeError::BodyTooLong
    );
    assert_eq!(
        one(&raw(0x06, 9, &[0, 0, 0, 1]), AGENT),
        Frame::Window {
            cid: 9,
            increment: 1
        }
    );
}

#[test]
fn ping_pong_bodies_are_exactly_8_bytes() {
    for ty in [0x09u8, 0x0A] {
        assert_eq!(err(&raw(ty, 0, &[0; 7]), HUB), DecodeError::BodyTooShort);
        assert_eq!(err(&raw(ty, 0, &[0; 9]), HUB), DecodeError::BodyTooLong);
        assert_eq!(err(&raw(ty, 0, &[]), HUB), DecodeError::BodyTooShort);
        assert!(dec(&raw(ty, 0, &[0; 8]), AGENT).is_ok());
    }
}

#[test]
fn data_rules() {
    assert_eq!(err(&raw(0x05, 1, &[0; 4]), HUB), DecodeError::EmptyData);
    assert_eq!(DecodeError::EmptyData.kind(), "empty_data");
    for short in 0..4 {
        assert_eq!(
            err(&raw(0x05, 1, &vec![0; short]), HUB),
            DecodeError::BodyTooShort
        );
    }
    let max = vec![7u8; DEFAULT_MAX_FRAME as usize];
    let mut body = vec![0, 0, 0, 9];
    body.extend_from_slice(&max);
    let msg = raw(0x05, 3, &body);
    assert_eq!(
        one(&msg, AGENT),
        Frame::Data {
            cid: 3,
            seq: 9,
            payload: &max
        }
    );
    body.push(7);
    assert_eq!(err(&raw(0x05, 3, &body), AGENT), DecodeError::BodyTooLong);
}

#[test]
fn bad_utf8_in_strings() {
    // RST reason, GOAWAY reason.
    assert_eq!(err(&raw(0x08, 1, &[0, 1, 0xC3]), HUB), DecodeError::BadUtf8);
    assert_eq!(
        err(&raw(0x0C, 0, &[0, 0, 0, 0, 0, 0, 0xFF]), AGENT),
        DecodeError::BadUtf8
    );
    // OPEN connector and peer, OPEN_OK backend.
    assert_eq!(
        err(&raw(0x03, 1, &[2, 0xC3, 0x28, 0]), HUB),
        DecodeError::BadUtf8
    );
    assert_eq!(
        err(&raw(0x03, 1, &[1, b'l', 1, 0xFF]), HUB),
        DecodeError::BadUtf8
    );
    assert_eq!(err(&raw(0x04, 1, &[1, 0x80]), AGENT), DecodeError::BadUtf8);
    // Valid multi-byte text is fine in reasons.
    let msg = raw(0x08, 1, "\0\x01é ✓".as_bytes());
    assert!(matches!(
        one(&msg, HUB),
        Frame::Rst {
            reason: "é ✓",
            code: 1,
            ..
        }
    ));
}

#[test]
fn connector_names() {
    for bad in ["ld ap", "ldap/", "é", "a:b", "ldap\0", ""] {
        let mut body = vec![bad.len() as u8];
        body.extend_from_slice(bad.as_bytes());
        body.extend_from_slice(&[1, b'p']);
        assert_eq!(
            err(&raw(0x03, 1, &body), HUB),
            DecodeError::BadConnector,
            "{bad:?}"
        );
        assert!(!valid_connector(bad));
    }
    let longest = "a".repeat(MAX_CONNECTOR);
    let too_long = "a".repeat(MAX_CONNECTOR + 1);
    for (name, ok) in [(&longest, true), (&too_long, false)] {
        let mut body = vec![name.len() as u8];
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        let msg = raw(0x03, 1, &body);
        let r = dec(&msg, HUB);
        if ok {
            assert!(r.is_ok(), "{} bytes", name.len());
        } else {
            assert_eq!(r, Err(DecodeError::BadConnector), "{} bytes", name.len());
        }
    }
    assert!(valid_connector("A-z_0.9"));
    // Empty connector and empty peer: under OPEN's 3-byte minimum (§10).
    assert_eq!(err(&raw(0x03, 1, &[0, 0]), HUB), DecodeError::BodyTooShort);
}

#[test]
fn open_lengths() {
    // connector length prefix overruns the body.
    assert_eq!(
        err(&raw(0x03, 1, &[10, b'l', b'd', b'a', b'p']), HUB),
        DecodeError::BadLength
    );
    // peer length prefix overruns the body.
    assert_eq!(
        err(&raw(0x03, 1, &[1, b'l', 5, b'1']), HUB),
        DecodeError::BadLength
    );
    // peer length missing.
    assert_eq!(
        err(&raw(0x03, 1, &[2, b'l', b'd']), HUB),
        DecodeError::BadLength
    );
    // bytes after peer.
    assert_eq!(
        err(&raw(0x03, 1, &[1, b'l', 0, 0]), HUB),
        DecodeError::BadLength
    );
    // below the fixed part.
    assert_eq!(
        err(&raw(0x03, 1, &[1, b'l']), HUB),
        DecodeError::BodyTooShort
    );
    // peer up to 64 bytes.
    let peer = "1".repeat(MAX_PEER);
    let f = Frame::Open {
        cid: 1,
        connector: "l",
        peer: &peer,
    };
    assert_eq!(one(&enc(&f), HUB), f);
    let mut body = vec![1, b'l', MAX_PEER as u8 + 1];
    body.extend_from_slice("1".repeat(MAX_PEER + 1).as_bytes());
    assert_eq!(err(&raw(0x03, 1, &body), HUB), DecodeError::BadLength);
    // over the largest OPEN (2 + 64 + 64).
    let body = vec![0u8; 2 + MAX_CONNECTOR + MAX_PEER + 1];
    assert_eq!(err(&raw(0x03, 1, &body), HUB), DecodeError::BodyTooLong);
}

#[test]
fn open_ok_lengths() {
    assert_eq!(err(&raw(0x04, 1, &[]), AGENT), DecodeError::BodyTooShort);
    assert_eq!(
        err(&raw(0x04, 1, &[3, b'a']), AGENT),
        DecodeError::BadLength
    );
    assert_eq!(
        err(&raw(0x04, 1, &[1, b'a', b'b']), AGENT),
        DecodeError::BadLength
    );
    let backend = "b".repeat(255);
    let f = Frame::OpenOk {
        cid: 2,
        backend: &backend,
    };
    assert_eq!(one(&enc(&f), AGENT), f);
    assert_eq!(
        err(&raw(0x04, 1, &[0; 257]), AGENT),
        DecodeError::BodyTooLong
    );
}

#[test]
fn reasons_up_to_256_bytes() {
    let reason = "r".repeat(MAX_REASON);
    let rst = Frame::Rst {
        cid: 1,
        code: 9,
        reason: &reason,
    };
    let goaway = Frame::GoAway {
        code: 11,
        last_cid: 3,
        reason: &reason,
    };
    assert_eq!(one(&enc(&rst), AGENT), rst);
    assert_eq!(one(&enc(&goaway), AGENT), goaway);
    assert_eq!(
        err(&raw(0x08, 1, &[b'r'; 2 + MAX_REASON + 1]), HUB),
        DecodeError::BodyTooLong
    );
    assert_eq!(
        err(&raw(0x0C, 0, &[b'r'; 6 + MAX_REASON + 1]), HUB),
        DecodeError::BodyTooLong
    );
    assert_eq!(err(&raw(0x08, 1, &[0]), HUB), DecodeError::BodyTooShort);
    assert_eq!(err(&raw(0x0C, 0, &[0; 5]), HUB), DecodeError::BodyTooShort);
}

#[test]
fn encode_truncates_long_reasons_on_a_char_boundary() {
    let long = "é".repeat(200); // 400 bytes
    for f in [
        Frame::Rst {
            cid: 1,
            code: 1,
            reason: &long,
        },
        Frame::GoAway {
            code: 1,
            last_cid: 0,
            reason: &long,
        },
    ] {
        let bytes = enc(&f);
        let r = match one(&bytes, HUB) {
            Frame::Rst { reason, .. } | Frame::GoAway { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(r, "é".repeat(MAX_REASON / 2));
    }
    assert_eq!(truncate_utf8("aé", 2), "a");
    assert_eq!(truncate_utf8("aé", 3), "aé");
    assert_eq!(truncate_utf8("", 0), "");
}

#[test]
fn renew_token_rules() {
    let token = "t".repeat(MAX_TOKEN);
    let f = Frame::Renew { token: &token };
    assert_eq!(one(&enc(&f), AGENT), f);
    assert_eq!(
        err(&raw(0x0D, 0, &[b't'; MAX_TOKEN + 1]), AGENT),
        DecodeError::BodyTooLong
    );
    assert_eq!(
        err(&raw(0x0D, 0, "tök".as_bytes()), AGENT),
        DecodeError::BadUtf8
    );
    assert_eq!(
        err(&raw(0x0D, 0, &[b't', 0xFF]), AGENT),
        DecodeError::BadUtf8
    );
    assert_eq!(err(&raw(0x0D, 0, &[]), AGENT), DecodeError::BodyTooShort);
}

#[test]
fn huge_declared_length_is_rejected_before_allocation() {
    // A 9-byte header claiming u32::MAX bytes: BodyTooLong from the header alone, for every
    // type (the decoder never waits for, nor reserves, the claimed body).
    for ty in 1..=14u8 {
        let t = FrameType::from_u8(ty).expect("known type");
        let cid = u32::from(t.is_stream());
        let sender = allowed_sender(t);
        for len in [u32::MAX, 0xFFFF_FFF0, 0x8000_0000] {
            let msg = raw_len(ty, cid, len, &[]);
            assert_eq!(
                err(&msg, sender),
                DecodeError::BodyTooLong,
                "{t:?} len {len:#x}"
            );
        }
    }
}

#[test]
fn decoder_stops_after_the_first_error() {
    let mut msg = enc(&Frame::Ping { opaque: 1 });
    msg.extend_from_slice(&raw(0x0F, 0, &[]));
    msg.extend_from_slice(&enc(&Frame::Ping { opaque: 2 }));
    let items: Vec<_> = Decoder::new(&msg, HUB, DEFAULT_MAX_FRAME).collect();
    assert_eq!(
        items,
        vec![
            Ok(Frame::Ping { opaque: 1 }),
            Err(DecodeError::UnknownType(0x0F))
        ]
    );
}

#[test]
fn error_kinds_are_stable_labels() {
    use DecodeError::*;
    let all = [
        (PartialFrame, "partial_frame"),
        (UnknownType(0), "unknown_type"),
        (WrongCidClass, "wrong_cid_class"),
        (WrongDirection, "wrong_direction"),
        (BodyTooLong, "body_too_long"),
        (BodyTooShort, "body_too_short"),
        (BadLength, "bad_length"),
        (BadUtf8, "bad_utf8"),
        (BadJson, "bad_json"),
        (BadConnector, "bad_connector"),
        (WindowZero, "window_zero"),
        (EmptyData, "empty_data"),
        (FinDirMismatch, "fin_dir_mismatch"),
        (EmptyMessage, "empty_message"),
    ];
    for (e, kind) in all {
        assert_eq!(e.kind(), kind);
        if !matches!(e, UnknownType(_)) {
            assert_eq!(e.to_string(), kind);
        }
    }
}
