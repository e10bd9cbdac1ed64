//! Scripted session tests: one rule of wire-protocol.md per test, each written as a script
//! (open → send → finish → drive → assert events / bytes / frames) that fails if the rule breaks.

// STYLE.md habit 10: `unwrap_used` applies outside tests.
#![allow(clippy::unwrap_used)]

use nowconnect_core::frame::{decode_message, encode_data, FinDir};
use nowconnect_core::testing::{hello, Endpoint, Pair};
use nowconnect_core::{
    close, BackendHealth, Code, Config, ConnectorHealth, Duration, Event, Frame, HealthReport,
    Hello, HelloAck, Instant, OpenError, Session, Side,
};

// ----- helpers -----

const MAX_CREDIT: u32 = (1 << 31) - 1;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Deterministic, position-dependent bytes (so reordering or duplication shows).
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(u32::from(seed)) as u8
                ^ (i >> 8) as u8
        })
        .collect()
}

/// The close code in the side's `SessionClosed` event, if any.
fn closed_code(end: &Endpoint) -> Option<u16> {
    end.events.iter().find_map(|e| match e {
        Event::SessionClosed { code, .. } => Some(*code),
        _ => None,
    })
}

/// Every Reset event for `cid`: (code, remote).
fn resets(end: &Endpoint, cid: u32) -> Vec<(Code, bool)> {
    end.events
        .iter()
        .filter_map(|e| match e {
            Event::Reset {
                cid: c,
                code,
                remote,
                ..
            } if *c == cid => Some((*code, *remote)),
            _ => None,
        })
        .collect()
}

fn saw_stream_closed(end: &Endpoint, cid: u32) -> bool {
    end.saw(|e| matches!(e, Event::StreamClosed { cid: c } if *c == cid))
}

fn saw_finished(end: &Endpoint, cid: u32) -> bool {
    end.saw(|e| matches!(e, Event::Finished { cid: c } if *c == cid))
}

/// Index of the first event matching `f`.
fn pos(end: &Endpoint, f: impl Fn(&Event) -> bool) -> Option<usize> {
    end.events.iter().position(f)
}

fn assert_alive(p: &Pair) {
    assert_eq!(
        p.hub.close_reason(),
        None,
        "hub closed: {:?}",
        p.hub_end.events
    );
    assert_eq!(
        p.agent.close_reason(),
        None,
        "agent closed: {:?}",
        p.agent_end.events
    );
}

/// Runs a full exchange on `cid` both ways and checks it completes (the stream is healthy).
fn exchange(p: &mut Pair, cid: u32, len: usize) {
    let up = pattern(1, len);
    let down = pattern(2, len);
    p.send_all(Side::Hub, cid, &up);
    p.send_all(Side::Agent, cid, &down);
    p.finish(Side::Hub, cid);
    p.finish(Side::Agent, cid);
    p.drive();
    assert_eq!(p.received(Side::Agent, cid), &up[..]);
    assert_eq!(p.received(Side::Hub, cid), &down[..]);
    assert!(saw_stream_closed(&p.hub_end, cid) && saw_stream_closed(&p.agent_end, cid));
}

fn msg(frame: &Frame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    frame.encode(&mut v);
    v
}

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

/// Drains every message `s` has to send at `now`.
fn drain_tx(s: &mut Session, now: Instant) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let mut m = Vec::new();
        if !s.poll_transmit(now, &mut m) {
            return out;
        }
        out.push(m);
    }
}

fn drain_events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn test_ack() -> HelloAck {
    HelloAck {
        session: "s-raw".into(),
        accepted: vec!["ldap".into()],
        rejected: vec![],
        window: 0,
        max_frame: 0,
        heartbeat_ms: 0,
        ver: 1,
    }
}

/// A raw agent session (no Pair) that has received HELLO_ACK from `cfg_hub`'s values.
fn raw_agent(cfg: Config) -> Session {
    let mut a = Session::new_agent(cfg, hello(&["ldap"]), t(0));
    let _ = drain_tx(&mut a, t(0));
    let ack = HelloAck {
        window: 262_144,
        max_frame: 65_536,
        heartbeat_ms: 20_000,
        ..test_ack()
    };
    a.handle_message(t(0), &msg(&Frame::HelloAck(ack)));
    assert!(a.is_established());
    let _ = drain_tx(&mut a, t(0));
    let _ = drain_events(&mut a);
    a
}

fn open_frame(cid: u32) -> Vec<u8> {
    msg(&Frame::Open {
        cid,
        connector: "ldap",
        peer: "10.0.0.1:5000",
    })
}

// ===== §3 handshake =====

#[test]
fn agent_first_frame_is_hello_and_hub_first_is_hello_ack() {
    let mut agent = Session::new_agent(Config::default(), hello(&["ldap"]), t(0));
    let out = drain_tx(&mut agent, t(0));
    assert_eq!(out.len(), 1);
    let frames = decode_message(&out[0], Side::Agent, 65_536).unwrap();
    match &frames[0] {
        Frame::Hello(h) => {
            assert_eq!(h.agent_id, "agent-1");
            assert_eq!(h.connectors, ["ldap"]);
            assert_eq!(h.ver, 1);
            assert_eq!(h.window, Config::default().window);
            assert_eq!(h.max_streams, Config::default().max_streams);
        }
        other => panic!("first frame {other:?}"),
    }

    let mut hub = Session::new_hub(Config::default(), t(0));
    assert!(
        drain_tx(&mut hub, t(0)).is_empty(),
        "hub speaks before HELLO"
    );
    hub.handle_message(t(5), &out[0]);
    assert!(matches!(drain_events(&mut hub)[..], [Event::Hello(_)]));
    assert!(
        drain_tx(&mut hub, t(5)).is_empty(),
        "hub speaks before accept_hello"
    );
    assert_eq!(
        hub.open(t(5), "ldap", "", None),
        Err(OpenError::NotEstablished)
    );
    hub.accept_hello(t(5), test_ack());
    let out = drain_tx(&mut hub, t(5));
    let frames = decode_message(&out[0], Side::Hub, 65_536).unwrap();
    assert!(matches!(frames[0], Frame::HelloAck(_)), "{frames:?}");
}

#[test]
fn hello_ack_fields_come_from_hub_config() {
    let hub_cfg = Config {
        window: 100_000,
        max_frame: 32_768,
        heartbeat: secs(15),
        ..Config::default()
    };
    let agent_cfg = Config {
        window: 50_000,
        max_streams: 77,
        ..Config::default()
    };
    let p = Pair::connected_with(hub_cfg, agent_cfg);
    let h = p
        .hub_end
        .events
        .iter()
        .find_map(|e| match e {
            Event::Hello(h) => Some(h.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!((h.window, h.max_streams, h.ver), (50_000, 77, 1));
    let ack = p
        .agent_end
        .events
        .iter()
        .find_map(|e| match e {
            Event::Established(a) => Some(a.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(ack.session, "s-1");
    assert_eq!(ack.accepted, ["ldap", "ssh"]);
    assert_eq!(ack.window, 100_000);
    assert_eq!(ack.max_frame, 32_768);
    assert_eq!(ack.heartbeat_ms, 15_000);
    assert_eq!(ack.ver, 1);
    assert_eq!(p.agent.max_frame(), 32_768);
    assert_eq!(p.agent.heartbeat(), secs(15));
}

#[test]
fn frame_before_hello_closes_4400() {
    // Hub: a PING ahead of HELLO.
    let mut p = Pair::new(Config::default(), Config::default());
    p.inject(Side::Agent, &Frame::Ping { opaque: 1 });
    p.drive();
    assert_eq!(closed_code(&p.hub_end), Some(close::PROTOCOL_ERROR));
    assert!(!p.hub_end.saw(|e| matches!(e, Event::Hello(_))));

    // Agent: a PING ahead of HELLO_ACK.
    let mut agent = Session::new_agent(Config::default(), hello(&["ldap"]), t(0));
    let _ = drain_tx(&mut agent, t(0));
    agent.handle_message(t(1), &msg(&Frame::Ping { opaque: 1 }));
    assert_eq!(
        agent.close_reason().map(|c| c.0),
        Some(close::PROTOCOL_ERROR)
    );
}

#[test]
fn second_hello_closes_4400() {
    // While the hub is deciding (HELLO received, not yet answered).
    let mut p = Pair::new(Config::default(), Config::default());
    p.drive();
    p.inject(Side::Agent, &Frame::Hello(hello(&["ldap"])));
    p.drive();
    assert_eq!(closed_code(&p.hub_end), Some(close::PROTOCOL_ERROR));

    // After establishment, both directions.
    let mut p = Pair::connected();
    p.inject(Side::Agent, &Frame::Hello(hello(&["ldap"])));
    p.drive();
    assert_eq!(closed_code(&p.hub_end), Some(close::PROTOCOL_ERROR));

    let mut p = Pair::connected();
    p.inject(Side::Hub, &Frame::HelloAck(test_ack()));
    p.drive();
    assert_eq!(closed_code(&p.agent_end), Some(close::PROTOCOL_ERROR));
}

#[test]
fn hello_timeout_closes_4408_on_both_sides() {
    // The HELLO is lost: the hub never hears it, the agent never gets HELLO_ACK.
    let mut p = Pair::new(Config::default(), Config::default());
    p.cut_to_hub = true;
    p.advance(ms(9_999));
    assert_alive(&p);
    p.advance(ms(1));
    assert_eq!(closed_code(&p.hub_end), Some(close::TIMEOUT));
    assert_eq!(closed_code(&p.agent_end), Some(close::TIMEOUT));

    // The hub got HELLO but never answered: the agent still gives up at 10 s.
    let mut p = Pair::new(Config::default(), Config::default());
    p.drive();
    assert!(p.hub_end.saw(|e| matches!(e, Event::Hello(_))));
    p.advance(secs(10));
    assert_eq!(closed_code(&p.agent_end), Some(close::TIMEOUT));
}

#[test]
fn version_2_closes_4426() {
    let mut hub = Session::new_hub(Config::default(), t(0));
    let h = Hello {
        ver: 2,
        ..hello(&["ldap"])
    };
    hub.handle_message(t(1), &msg(&Frame::Hello(h)));
    assert_eq!(
        hub.close_reason().map(|c| c.0),
        Some(close::UNSUPPORTED_VERSION)
    );

    let mut agent = Session::new_agent(Config::default(), hello(&["ldap"]), t(0));
    let _ = drain_tx(&mut agent, t(0));
    let ack = HelloAck {
        ver: 2,
        ..test_ack()
    };
    agent.handle_message(t(1), &msg(&Frame::HelloAck(ack)));
    assert_eq!(
        agent.close_reason().map(|c| c.0),
        Some(close::UNSUPPORTED_VERSION)
    );
}

#[test]
fn accept_hello_with_nothing_accepted_closes_4403() {
    let mut p = Pair::new(Config::default(), Config::default());
    p.drive();
    let ack = HelloAck {
        accepted: vec![],
        ..test_ack()
    };
    p.hub.accept_hello(p.now, ack);
    let sent = drain_tx(&mut p.hub, p.now);
    assert!(sent.is_empty(), "no HELLO_ACK may go out");
    p.drive();
    assert_eq!(closed_code(&p.hub_end), Some(close::FORBIDDEN));
    assert!(!p.agent.is_established());
}

#[test]
fn agent_heartbeat_is_min_of_hello_ack_and_own() {
    let own_smaller = Config {
        heartbeat: secs(5),
        ..Config::default()
    };
    let mut p = Pair::connected_with(Config::default(), own_smaller);
    assert_eq!(p.agent.heartbeat(), secs(5));
    // And it is used: the agent pings after 5 s of silence, not before.
    let start = p.now;
    p.agent.handle_timeout(start + ms(4_999));
    assert!(drain_tx(&mut p.agent, start + ms(4_999)).is_empty());
    p.agent.handle_timeout(start + secs(5));
    let out = drain_tx(&mut p.agent, start + secs(5));
    let frames = decode_message(&out[0], Side::Agent, 65_536).unwrap();
    assert!(matches!(frames[..], [Frame::Ping { .. }]), "{frames:?}");

    let hub_smaller = Config {
        heartbeat: secs(3),
        ..Config::default()
    };
    let p = Pair::connected_with(hub_smaller, Config::default());
    assert_eq!(p.agent.heartbeat(), secs(3));
}

#[test]
fn hello_ack_max_frame_bounds_data_even_in_the_ack_message() {
    // The hub's max_frame is larger than the agent's configured one; DATA pipelined right after
    // HELLO_ACK (same WebSocket message) must already be judged by HELLO_ACK's max_frame.
    let hub_cfg = Config {
        max_frame: 128 * 1024,
        ..Config::default()
    };
    let mut p = Pair::new(hub_cfg, Config::default());
    p.drive();
    p.hub.accept_hello(p.now, test_ack());
    let cid = p.hub.open(p.now, "ldap", "1.2.3.4:5", None).unwrap();
    let data = pattern(7, 200_000);
    assert_eq!(p.send(Side::Hub, cid, &data), 200_000);
    p.drive();
    assert_alive(&p);
    assert_eq!(p.received(Side::Agent, cid), &data[..]);
}

// ===== §4 streams =====

#[test]
fn open_data_finish_both_ways() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    let up = pattern(3, 1_000_000);
    let down = pattern(4, 1_500_000);
    p.send_all(Side::Hub, cid, &up);
    p.send_all(Side::Agent, cid, &down);
    p.finish(Side::Hub, cid);
    p.finish(Side::Agent, cid);
    p.drive();
    assert_eq!(p.received(Side::Agent, cid), &up[..]);
    assert_eq!(p.received(Side::Hub, cid), &down[..]);
    assert!(p.agent_end.saw(
        |e| matches!(e, Event::OpenRequest { cid: 1, connector, peer }
        if connector == "ldap" && peer == "127.0.0.1:40000")
    ));
    assert!(p
        .hub_end
        .saw(|e| matches!(e, Event::Opened { cid: 1, backend } if backend == "target:1")));
    for end in [&p.hub_end, &p.agent_end] {
        let fin = pos(end, |e| matches!(e, Event::Finished { cid: 1 })).unwrap();
        let closed = pos(end, |e| matches!(e, Event::StreamClosed { cid: 1 })).unwrap();
        assert!(fin < closed);
        assert!(resets(end, cid).is_empty());
    }
    assert_eq!((p.hub.active_streams(), p.agent.active_streams()), (0, 0));
    assert_alive(&p);
}

#[test]
fn pipelined_data_is_held_until_accept_stream() {
    let mut p = Pair::connected();
    p.auto_accept = false;
    let cid = p.open("ldap");
    let data = pattern(5, 100_000);
    assert_eq!(p.send(Side::Hub, cid, &data), data.len());
    p.finish(Side::Hub, cid);
    p.drive();
    assert!(p.agent_end.saw(|e| matches!(e, Event::OpenRequest { .. })));
    assert!(
        p.received(Side::Agent, cid).is_empty(),
        "data before accept_stream"
    );
    assert!(!saw_finished(&p.agent_end, cid), "FIN before accept_stream");
    // The agent may not send before OPEN_OK either: no DATA, and a FIN waits for OPEN_OK.
    assert_eq!(p.agent.send_capacity(cid), 0);
    p.finish(Side::Agent, cid);
    p.drive();
    assert!(!saw_finished(&p.hub_end, cid), "agent FIN before OPEN_OK");

    p.agent.accept_stream(p.now, cid, "dc1:389");
    p.drive();
    assert_eq!(p.received(Side::Agent, cid), &data[..]);
    assert!(saw_finished(&p.agent_end, cid));
    let req = pos(&p.agent_end, |e| matches!(e, Event::OpenRequest { .. })).unwrap();
    let fin = pos(&p.agent_end, |e| matches!(e, Event::Finished { .. })).unwrap();
    assert!(req < fin);
    let opened = pos(
        &p.hub_end,
        |e| matches!(e, Event::Opened { backend, .. } if backend == "dc1:389"),
    );
    let fin = pos(&p.hub_end, |e| matches!(e, Event::Finished { .. }));
    assert!(opened.unwrap() < fin.unwrap(), "{:?}", p.hub_end.events);
    assert!(saw_stream_closed(&p.hub_end, cid) && saw_stream_closed(&p.agent_end, cid));
}

#[test]
fn pipelined_data_is_discarded_on_reset() {
    // Agent refuses the stream.
    let mut p = Pair::connected();
    p.auto_accept = false;
    let cid = p.open("ldap");
    p.send(Side::Hub, cid, &pattern(6, 10_000));
    p.drive();
    p.reset(Side::Agent, cid, Code::CONNECT_REFUSED);
    p.agent.accept_stream(p.now, cid, "late"); // no longer exists: no-op
    p.drive();
    assert!(p.received(Side::Agent, cid).is_empty());
    assert_eq!(resets(&p.hub_end, cid), [(Code::CONNECT_REFUSED, true)]);
    assert!(!p.hub_end.saw(|e| matches!(e, Event::Opened { .. })));

    // Hub gives up while the agent is still connecting.
    let mut p = Pair::connected();
    p.auto_accept = false;
    let cid = p.open("ldap");
    p.send(Side::Hub, cid, &pattern(6, 10_000));
    p.drive();
    p.reset(Side::Hub, cid, Code::RESET_BY_PEER);
    p.drive();
    p.agent.accept_stream(p.now, cid, "late");
    p.drive();
    assert!(p.received(Side::Agent, cid).is_empty());
    assert_eq!(resets(&p.agent_end, cid), [(Code::RESET_BY_PEER, true)]);
    assert_alive(&p);
}

#[test]
fn seq_gap_resets_only_that_stream() {
    let mut p = Pair::connected();
    let bad = p.open("ldap");
    let good = p.open("ldap");
    p.send_all(Side::Hub, bad, b"abc");
    p.drive();
    // seq 0 was used; seq 2 is a gap.
    let mut m = Vec::new();
    encode_data(&mut m, bad, 2, b"gap");
    p.to_agent.push_back(m);
    p.drive();
    assert_eq!(resets(&p.agent_end, bad), [(Code::PROTOCOL_ERROR, false)]);
    assert_eq!(resets(&p.hub_end, bad), [(Code::PROTOCOL_ERROR, true)]);
    assert_eq!(p.received(Side::Agent, bad), b"abc");
    assert_alive(&p);
    exchange(&mut p, good, 300_000);
}

#[test]
fn seq_repeat_resets_only_that_stream() {
    let mut p = Pair::connected();
    let bad = p.open("ldap");
    let good = p.open("ldap");
    p.send_all(Side::Agent, bad, b"first");
    p.drive();
    // The agent's seq 0 again, towards the hub.
    let mut m = Vec::new();
    encode_data(&mut m, bad, 0, b"again");
    p.to_hub.push_back(m);
    p.drive();
    assert_eq!(resets(&p.hub_end, bad), [(Code::PROTOCOL_ERROR, false)]);
    assert_eq!(resets(&p.agent_end, bad), [(Code::PROTOCOL_ERROR, true)]);
    assert_eq!(p.received(Side::Hub, bad), b"first");
    assert_alive(&p);
    exchange(&mut p, good, 300_000);
}

#[test]
fn data_beyond_credit_is_flow_control_error() {
    let agent_cfg = Config {
        window: 4096,
        ..Config::default()
    };
    let mut p = Pair::connected_with(Config::default(), agent_cfg);
    let cid = p.open("ldap");
    let other = p.open("ldap");
    p.stall(Side::Agent, cid);
    assert_eq!(p.send(Side::Hub, cid, &pattern(1, 10_000)), 4096);
    p.drive();
    assert_eq!(p.hub.send_capacity(cid), 0);
    // One byte more than the credit (seq 1 is the right next seq).
    let mut m = Vec::new();
    encode_data(&mut m, cid, 1, b"x");
    p.to_agent.push_back(m);
    p.drive();
    assert_eq!(
        resets(&p.agent_end, cid),
        [(Code::FLOW_CONTROL_ERROR, false)]
    );
    assert_eq!(resets(&p.hub_end, cid), [(Code::FLOW_CONTROL_ERROR, true)]);
    assert_alive(&p);

    // A single oversized DATA on a fresh stream.
    let mut m = Vec::new();
    encode_data(&mut m, other, 0, &pattern(2, 4097));
    p.to_agent.push_back(m);
    p.drive();
    assert_eq!(
        resets(&p.agent_end, other),
        [(Code::FLOW_CONTROL_ERROR, false)]
    );
    assert!(p.received(Side::Agent, other).is_empty());
    assert_alive(&p);
}

#[test]
fn window_overflow_is_flow_control_error() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.drive();
    let initial = p.hub.send_credit(cid).unwrap() as u32;
    // Up to exactly 2^31−1 is fine.
    p.inject(
        Side::Agent,
        &Frame::Window {
            cid,
            increment: MAX_CREDIT - initial,
        },
    );
    p.drive();
    assert!(resets(&p.hub_end, cid).is_empty());
    assert_eq!(p.hub.send_credit(cid), Some(u64::from(MAX_CREDIT)));
    // One more is an overflow.
    p.inject(Side::Agent, &Frame::Window { cid, increment: 1 });
    p.drive();
    assert_eq!(resets(&p.hub_end, cid), [(Code::FLOW_CONTROL_ERROR, false)]);
    assert_eq!(
        resets(&p.agent_end, cid),
        [(Code::FLOW_CONTROL_ERROR, true)]
    );
    assert_alive(&p);
}

#[test]
fn data_after_fin_is_reset() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.send_all(Side::Hub, cid, b"x");
    p.finish(Side::Hub, cid);
    p.drive();
    assert!(saw_finished(&p.agent_end, cid));
    let mut m = Vec::new();
    encode_data(&mut m, cid, 1, b"y");
    p.to_agent.push_back(m);
    p.drive();
    assert_eq!(resets(&p.agent_end, cid), [(Code::PROTOCOL_ERROR, false)]);
    assert_eq!(resets(&p.hub_end, cid), [(Code::PROTOCOL_ERROR, true)]);
    assert_eq!(p.received(Side::Agent, cid), b"x");
    assert_alive(&p);
}

#[test]
fn data_from_agent_before_open_ok_is_reset() {
    let mut p = Pair::connected();
    p.auto_accept = false;
    let cid = p.open("ldap");
    p.drive();
    let mut m = Vec::new();
    encode_data(&mut m, cid, 0, b"early");
    p.to_hub.push_back(m);
    p.drive();
    assert_eq!(resets(&p.hub_end, cid), [(Code::PROTOCOL_ERROR, false)]);
    assert!(p.received(Side::Hub, cid).is_empty());
    assert_alive(&p);
}

#[test]
fn half_close_keeps_the_other_direction_alive() {
    // Hub FIN first (client EOF); the agent keeps answering for a long while.
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.send_all(Side::Hub, cid, b"unbind");
    p.finish(Side::Hub, cid);
    p.drive();
    assert!(saw_finished(&p.agent_end, cid));
    assert_eq!(p.hub.send_capacity(cid), 0, "no sending after own FIN");
    let down = pattern(9, 3 * 1024 * 1024);
    p.send_all(Side::Agent, cid, &down);
    p.drive();
    assert_eq!(p.received(Side::Hub, cid), &down[..]);
    assert!(!saw_stream_closed(&p.hub_end, cid) && !saw_stream_closed(&p.agent_end, cid));
    assert_eq!((p.hub.active_streams(), p.agent.active_streams()), (1, 1));
    p.finish(Side::Agent, cid);
    p.drive();
    assert!(saw_stream_closed(&p.hub_end, cid) && saw_stream_closed(&p.agent_end, cid));
    assert_eq!(p.received(Side::Agent, cid), b"unbind");

    // Agent FIN first (target EOF); the hub keeps sending.
    let cid = p.open("ldap");
    p.drive();
    p.finish(Side::Agent, cid);
    p.drive();
    assert!(saw_finished(&p.hub_end, cid));
    let up = pattern(10, 2 * 1024 * 1024);
    p.send_all(Side::Hub, cid, &up);
    p.drive();
    assert!(!saw_stream_closed(&p.hub_end, cid) && !saw_stream_closed(&p.agent_end, cid));
    p.finish(Side::Hub, cid);
    p.drive();
    assert_eq!(p.received(Side::Agent, cid), &up[..]);
    assert!(saw_stream_closed(&p.hub_end, cid) && saw_stream_closed(&p.agent_end, cid));
    assert_alive(&p);
}

#[test]
fn reset_crossing_is_not_a_session_error() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.send_all(Side::Hub, cid, &pattern(1, 50_000));
    p.send_all(Side::Agent, cid, &pattern(2, 50_000));
    p.drive();
    // Both sides reset in the same step, with data and a FIN also in flight.
    p.send(Side::Hub, cid, b"more");
    p.send(Side::Agent, cid, b"more");
    p.reset(Side::Hub, cid, Code::RESET_BY_PEER);
    p.reset(Side::Agent, cid, Code::RESET_BY_PEER);
    p.drive();
    assert_alive(&p);
    // Late frames for the recently closed cid are ignored on both sides.
    p.inject(Side::Hub, &Frame::Window { cid, increment: 10 });
    p.inject(
        Side::Hub,
        &Frame::Fin {
            cid,
            dir: FinDir::C2a,
        },
    );
    p.inject(
        Side::Hub,
        &Frame::Rst {
            cid,
            code: 0,
            reason: "",
        },
    );
    let mut m = Vec::new();
    encode_data(&mut m, cid, 77, b"late");
    p.to_agent.push_back(m.clone());
    p.to_hub.push_back(m);
    p.inject(Side::Agent, &Frame::OpenOk { cid, backend: "" });
    p.inject(
        Side::Agent,
        &Frame::Fin {
            cid,
            dir: FinDir::A2c,
        },
    );
    p.inject(Side::Agent, &Frame::Window { cid, increment: 10 });
    p.drive();
    assert_alive(&p);
    assert!(resets(&p.hub_end, cid).is_empty() && resets(&p.agent_end, cid).is_empty());
    let next = p.open("ldap");
    exchange(&mut p, next, 10_000);
}

#[test]
fn stream_frame_above_highest_cid_closes_4400() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.drive();
    p.inject(
        Side::Agent,
        &Frame::Window {
            cid: cid + 1,
            increment: 1,
        },
    );
    p.drive();
    assert_eq!(closed_code(&p.hub_end), Some(close::PROTOCOL_ERROR));

    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.drive();
    let mut m = Vec::new();
    encode_data(&mut m, cid + 5, 0, b"?");
    p.to_agent.push_back(m);
    p.drive();
    assert_eq!(closed_code(&p.agent_end), Some(close::PROTOCOL_ERROR));
}

#[test]
fn open_with_non_increasing_cid_closes_4400() {
    for reused in [1, 2] {
        let mut p = Pair::connected();
        p.open("ldap");
        p.open("ldap");
        p.drive();
        p.inject(
            Side::Hub,
            &Frame::Open {
                cid: reused,
                connector: "ldap",
                peer: "",
            },
        );
        p.drive();
        assert_eq!(
            closed_code(&p.agent_end),
            Some(close::PROTOCOL_ERROR),
            "cid {reused}"
        );
    }
}

#[test]
fn credit_exhaustion_and_resume() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.drive();
    p.stall(Side::Hub, cid);
    let data = pattern(11, 1024 * 1024);
    let mut off = 0;
    for _ in 0..50 {
        off += p.send(Side::Agent, cid, &data[off..]);
        p.step();
        let window = p.hub.recv_window(cid).unwrap();
        let held = p.hub_end.unreleased.get(&cid).copied().unwrap_or(0) as u64;
        assert!(held <= window, "hub buffers {held} > window {window}");
    }
    p.drive();
    assert_eq!(off, 256 * 1024, "sender got more than one window of credit");
    assert_eq!(p.agent.send_capacity(cid), 0);
    assert_eq!(p.send(Side::Agent, cid, &data[off..]), 0);
    assert!(!p.agent_end.saw(|e| matches!(e, Event::Writable { .. })));
    assert_eq!(p.received(Side::Hub, cid).len(), off);

    p.unstall(Side::Hub, cid);
    p.drive();
    assert!(p
        .agent_end
        .saw(|e| matches!(e, Event::Writable { cid: c } if *c == cid)));
    assert!(p.agent.send_capacity(cid) > 0);
    p.send_all(Side::Agent, cid, &data[off..]);
    p.finish(Side::Agent, cid);
    p.finish(Side::Hub, cid);
    p.drive();
    assert_eq!(p.received(Side::Hub, cid), &data[..]);
    assert!(saw_stream_closed(&p.hub_end, cid));
}

/// A large window is credit, not a licence to queue: what a stream holds unframed is capped
/// by `max_unsent`, and a driver refused for a full queue hears `Writable` once half of it
/// is out — without any WINDOW from the peer.
#[test]
fn unsent_bytes_are_capped_and_draining_makes_the_stream_writable() {
    let hub = Config {
        max_unsent: 64 * 1024,
        ..Config::default()
    };
    let agent = Config {
        window: 4 * 1024 * 1024,
        ..Config::default()
    };
    let mut p = Pair::connected_with(hub, agent);
    let cid = p.open("ldap");
    p.drive();
    assert_eq!(p.hub.send_credit(cid), Some(4 * 1024 * 1024));
    assert_eq!(p.hub.send_capacity(cid), 64 * 1024);
    let data = pattern(14, 1024 * 1024);
    assert_eq!(p.send(Side::Hub, cid, &data), 64 * 1024);
    assert_eq!(p.send(Side::Hub, cid, &data[64 * 1024..]), 0, "queue full");
    p.hub_end.events.clear();
    // One message out (no WINDOW can come back: the agent's window is far from half used).
    let mut m = Vec::new();
    assert!(p.hub.poll_transmit(p.now, &mut m));
    assert!(p.hub_end.events.is_empty());
    let writable = std::iter::from_fn(|| p.hub.poll_event())
        .any(|e| matches!(e, Event::Writable { cid: c } if c == cid));
    assert!(writable, "no Writable after the queue drained");
    assert_eq!(p.hub.send_capacity(cid), 64 * 1024);
    p.to_agent.push_back(m);
    p.send_all(Side::Hub, cid, &data[64 * 1024..]);
    p.finish(Side::Hub, cid);
    p.finish(Side::Agent, cid);
    p.drive();
    assert_eq!(p.received(Side::Agent, cid), &data[..]);
    assert!(saw_stream_closed(&p.agent_end, cid));
}

#[test]
fn stalled_stream_does_not_delay_another() {
    let mut p = Pair::connected();
    let slow = p.open("ldap");
    let fast = p.open("ldap");
    p.drive();
    p.stall(Side::Hub, slow);
    let slow_data = pattern(12, 1024 * 1024);
    let mut sent = 0;
    while p.agent.send_capacity(slow) > 0 {
        sent += p.send(Side::Agent, slow, &slow_data[sent..]);
        p.drive();
    }
    let fast_data = pattern(13, 4 * 1024 * 1024);
    p.send_all(Side::Agent, fast, &fast_data);
    p.finish(Side::Agent, fast);
    p.finish(Side::Hub, fast);
    p.drive();
    assert_eq!(p.received(Side::Hub, fast), &fast_data[..]);
    assert!(saw_stream_closed(&p.hub_end, fast));
    // The slow stream is still stuck at one window, untouched.
    assert_eq!(p.received(Side::Hub, slow), &slow_data[..sent]);
    assert_eq!(p.agent.send_capacity(slow), 0);
    assert_eq!(p.hub.active_streams(), 1);
}

#[test]
fn control_frames_go_ahead_of_queued_data() {
    let mut p = Pair::connected();
    let a = p.open("ldap");
    p.drive();
    assert_eq!(p.send(Side::Hub, a, &pattern(1, 200_000)), 200_000);
    // Queued after the DATA, sent before it.
    let b = p.open("ssh");
    p.hub.renew_ack(p.now, 0); // some other control frame
    let out = drain_tx(&mut p.hub, p.now);
    let frames = decode_message(&out[0], Side::Hub, 65_536).unwrap();
    let first_data = frames
        .iter()
        .position(|f| matches!(f, Frame::Data { .. }))
        .unwrap();
    let open_at = frames
        .iter()
        .position(|f| matches!(f, Frame::Open { cid, .. } if *cid == b))
        .unwrap();
    let ack_at = frames
        .iter()
        .position(|f| matches!(f, Frame::RenewAck(_)))
        .unwrap();
    assert!(
        open_at < first_data && ack_at < first_data,
        "{:?}",
        frames.iter().map(Frame::frame_type).collect::<Vec<_>>()
    );
    p.to_agent.extend(out);
    p.drive();
    assert_alive(&p);
}

#[test]
fn data_of_bulk_streams_is_interleaved_round_robin() {
    let mut p = Pair::connected();
    let a = p.open("ldap");
    let b = p.open("ldap");
    p.drive();
    assert_eq!(p.send(Side::Hub, a, &pattern(1, 256 * 1024)), 256 * 1024);
    assert_eq!(p.send(Side::Hub, b, &pattern(2, 256 * 1024)), 256 * 1024);
    let out = drain_tx(&mut p.hub, p.now);
    let mut order = Vec::new();
    for m in &out {
        for f in decode_message(m, Side::Hub, 65_536).unwrap() {
            if let Frame::Data { cid, payload, .. } = f {
                assert!(payload.len() <= 65_536);
                order.push(cid);
            }
        }
    }
    assert_eq!(order.len(), 8);
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "not interleaved: {order:?}"
    );
    p.to_agent.extend(out);
    p.drive();
    assert_eq!(p.received(Side::Agent, a), &pattern(1, 256 * 1024)[..]);
    assert_eq!(p.received(Side::Agent, b), &pattern(2, 256 * 1024)[..]);

    // With a small max_frame, an interactive stream waits at most one chunk.
    let hub_cfg = Config {
        max_frame: 1024,
        ..Config::default()
    };
    let mut p = Pair::connected_with(hub_cfg, Config::default());
    let bulk = p.open("ldap");
    let chat = p.open("ldap");
    p.drive();
    p.send(Side::Agent, bulk, &pattern(3, 100_000));
    p.send(Side::Agent, chat, b"hi");
    let out = drain_tx(&mut p.agent, p.now);
    let frames = decode_message(&out[0], Side::Agent, 1024).unwrap();
    let data: Vec<(u32, usize)> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Data { cid, payload, .. } => Some((*cid, payload.len())),
            _ => None,
        })
        .collect();
    assert_eq!(data[0], (bulk, 1024));
    assert_eq!(data[1], (chat, 2));
    assert!(data.iter().all(|&(_, n)| n <= 1024));
}

#[test]
fn auto_tuning_grows_a_fast_stream_only() {
    let hub_cfg = Config {
        max_window: 2 * 1024 * 1024,
        ..Config::default()
    };
    let initial = u64::from(hub_cfg.window);
    let mut p = Pair::connected_with(hub_cfg, Config::default());
    let fast = p.open("ldap");
    let slow = p.open("ldap");
    p.drive();

    // Fast: the consumer releases at once, the window drains far quicker than 2×RTT.
    p.send_all(Side::Agent, fast, &pattern(1, 8 * 1024 * 1024));
    p.drive();
    assert_eq!(
        p.hub.recv_window(fast),
        Some(2 * 1024 * 1024),
        "fast stream did not grow to max_window"
    );

    // Slow: each window is released a second (≫ 2×RTT) after the previous one.
    p.stall(Side::Hub, slow);
    let data = pattern(2, 2 * 1024 * 1024);
    let mut off = 0;
    for _ in 0..6 {
        while p.agent.send_capacity(slow) > 0 {
            off += p.send(Side::Agent, slow, &data[off..]);
            p.drive();
        }
        p.advance(secs(1));
        p.unstall(Side::Hub, slow);
        p.drive();
        p.stall(Side::Hub, slow);
        assert_eq!(p.hub.recv_window(slow), Some(initial), "slow stream grew");
    }
    assert!(off as u64 >= 6 * initial);
    assert_eq!(p.received(Side::Hub, slow), &data[..off]);
    assert!(p.hub.rtt().is_some());
}

#[test]
fn max_buffered_caps_total_growth() {
    let budget = 768 * 1024;
    let hub_cfg = Config {
        max_buffered: budget,
        ..Config::default()
    };
    let initial = u64::from(hub_cfg.window);
    let mut p = Pair::connected_with(hub_cfg, Config::default());
    let cids: Vec<u32> = (0..3).map(|_| p.open("ldap")).collect();
    p.drive();
    for &cid in &cids {
        p.send_all(Side::Agent, cid, &pattern(cid as u8, 4 * 1024 * 1024));
    }
    p.drive();
    let grown: u64 = cids
        .iter()
        .map(|&c| p.hub.recv_window(c).unwrap() - initial)
        .sum();
    assert_eq!(
        grown, budget,
        "growth should reach the budget exactly, no more"
    );
    // Budget is returned when a grown stream ends; a new stream can grow again.
    p.reset(Side::Hub, cids[0], Code::NO_ERROR);
    p.drive();
    let next = p.open("ldap");
    p.drive();
    p.send_all(Side::Agent, next, &pattern(9, 4 * 1024 * 1024));
    p.drive();
    assert!(p.hub.recv_window(next).unwrap() > initial);
}

// ===== §5 liveness =====

#[test]
fn heartbeat_ping_pong_and_rtt() {
    let mut p = Pair::connected();
    let start = p.now;
    let rtt0 = p.hub.rtt();
    p.hub.handle_timeout(start + ms(19_999));
    assert!(
        drain_tx(&mut p.hub, start + ms(19_999)).is_empty(),
        "PING before heartbeat"
    );
    let t1 = start + secs(20);
    p.hub.handle_timeout(t1);
    let out = drain_tx(&mut p.hub, t1);
    let frames = decode_message(&out[0], Side::Hub, 65_536).unwrap();
    let Frame::Ping { opaque } = frames[0] else {
        panic!("expected PING, got {frames:?}");
    };
    // The agent echoes it at once, 40 ms later; the answer lands 80 ms after the PING.
    p.agent.handle_message(t1 + ms(40), &out[0]);
    let back = drain_tx(&mut p.agent, t1 + ms(40));
    let frames = decode_message(&back[0], Side::Agent, 65_536).unwrap();
    assert_eq!(frames, [Frame::Pong { opaque }]);
    p.hub.handle_message(t1 + ms(80), &back[0]);
    let rtt = p.hub.rtt().unwrap();
    assert_ne!(Some(rtt), rtt0, "RTT not updated");
    assert!(rtt > Duration::ZERO && rtt <= ms(80), "{rtt:?}");

    // An unsolicited PONG is ignored.
    p.hub
        .handle_message(t1 + ms(90), &msg(&Frame::Pong { opaque: 12345 }));
    assert_eq!(p.hub.rtt(), Some(rtt));
    assert_eq!(p.hub.close_reason(), None);
}

#[test]
fn pair_stays_alive_across_many_heartbeats() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.advance(secs(600));
    assert_alive(&p);
    exchange(&mut p, cid, 1000);
}

#[test]
fn heartbeat_death_resets_every_stream_then_closes_4408() {
    let mut p = Pair::connected();
    let a = p.open("ldap");
    let b = p.open("ssh");
    p.drive();
    p.cut_to_hub = true;
    p.advance(ms(59_999));
    assert_eq!(p.hub.close_reason(), None);
    p.advance(ms(1));
    assert_eq!(closed_code(&p.hub_end), Some(close::TIMEOUT));
    let closed = pos(&p.hub_end, |e| matches!(e, Event::SessionClosed { .. })).unwrap();
    assert_eq!(
        closed,
        p.hub_end.events.len() - 1,
        "SessionClosed must be last"
    );
    for cid in [a, b] {
        assert_eq!(resets(&p.hub_end, cid).len(), 1);
        assert!(!resets(&p.hub_end, cid)[0].1, "local reset");
        let r = pos(
            &p.hub_end,
            |e| matches!(e, Event::Reset { cid: c, .. } if *c == cid),
        )
        .unwrap();
        assert!(r < closed);
    }
    assert_eq!(p.hub.active_streams(), 0);
}

// ===== §4 idle streams, §10 open_timeout =====

#[test]
fn idle_stream_is_reset_within_a_second_and_active_one_is_not() {
    let mut p = Pair::connected();
    let opened = p.now;
    let idle = p
        .hub
        .open(p.now, "ldap", "1.1.1.1:1", Some(secs(10)))
        .unwrap();
    let active = p
        .hub
        .open(p.now, "ldap", "1.1.1.1:2", Some(secs(10)))
        .unwrap();
    p.drive();
    let mut reset_at = None;
    for i in 1..=60 {
        p.advance(ms(500));
        if i % 4 == 0 {
            p.send_all(Side::Agent, active, b".");
        }
        if reset_at.is_none() && !resets(&p.hub_end, idle).is_empty() {
            reset_at = Some(p.now);
        }
    }
    let at = reset_at.expect("idle stream never reset");
    let elapsed = at.saturating_since(opened);
    assert!(
        elapsed >= secs(10) && elapsed <= secs(11),
        "reset after {elapsed:?}"
    );
    assert_eq!(resets(&p.hub_end, idle), [(Code::IDLE_TIMEOUT, false)]);
    assert_eq!(resets(&p.agent_end, idle), [(Code::IDLE_TIMEOUT, true)]);
    assert!(
        resets(&p.hub_end, active).is_empty(),
        "active stream was reset"
    );
    assert_eq!(p.received(Side::Hub, active).len(), 15);
}

#[test]
fn agent_has_its_own_idle_sweeper() {
    let agent_cfg = Config {
        idle_timeout: Some(secs(5)),
        ..Config::default()
    };
    let mut p = Pair::connected_with(Config::default(), agent_cfg);
    let cid = p.open("ldap");
    p.drive();
    p.advance(ms(4_999));
    assert!(resets(&p.agent_end, cid).is_empty());
    p.advance(ms(1_001));
    assert_eq!(resets(&p.agent_end, cid), [(Code::IDLE_TIMEOUT, false)]);
    assert_eq!(resets(&p.hub_end, cid), [(Code::IDLE_TIMEOUT, true)]);
}

#[test]
fn open_timeout_resets_connect_timeout() {
    let mut p = Pair::connected();
    p.auto_accept = false;
    let opened = p.now;
    let cid = p.open("ldap");
    p.drive();
    p.advance(ms(14_999));
    assert!(resets(&p.hub_end, cid).is_empty());
    let mut at = None;
    for _ in 0..20 {
        p.advance(ms(100));
        if at.is_none() && !resets(&p.hub_end, cid).is_empty() {
            at = Some(p.now);
        }
    }
    let elapsed = at.expect("never timed out").saturating_since(opened);
    assert!(elapsed >= secs(15) && elapsed <= secs(16), "{elapsed:?}");
    assert_eq!(resets(&p.hub_end, cid), [(Code::CONNECT_TIMEOUT, false)]);
    assert_eq!(resets(&p.agent_end, cid), [(Code::CONNECT_TIMEOUT, true)]);
    // A late OPEN_OK is ignored.
    p.agent.accept_stream(p.now, cid, "late");
    p.drive();
    assert_alive(&p);
}

// ===== §6 GOAWAY, RENEW, HEALTH, max_streams =====

#[test]
fn goaway_drains_then_closes_1000() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.send_all(Side::Hub, cid, b"request");
    p.drive();
    p.hub.goaway(p.now, Code::SHUTDOWN, "bye");
    assert_eq!(
        p.hub.open(p.now, "ldap", "", None),
        Err(OpenError::Draining)
    );
    p.drive();
    assert!(p.agent_end.saw(|e| matches!(
        e,
        Event::GoAway {
            code: Code::SHUTDOWN,
            last_cid: 1,
            ..
        }
    )));
    assert!(p.agent.peer_draining());
    // The open stream keeps working and the session stays up until it ends.
    let answer = pattern(5, 500_000);
    p.send_all(Side::Agent, cid, &answer);
    p.finish(Side::Hub, cid);
    p.drive();
    assert_eq!(p.hub.close_reason(), None);
    p.finish(Side::Agent, cid);
    p.drive();
    assert_eq!(p.received(Side::Hub, cid), &answer[..]);
    assert_eq!(closed_code(&p.hub_end), Some(close::NORMAL));
    let sc = pos(&p.hub_end, |e| matches!(e, Event::StreamClosed { .. })).unwrap();
    let cl = pos(&p.hub_end, |e| matches!(e, Event::SessionClosed { .. })).unwrap();
    assert!(sc < cl);
}

#[test]
fn goaway_drain_ends_when_last_stream_is_reset_for_an_error() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.drive();
    p.hub.goaway(p.now, Code::SHUTDOWN, "bye");
    p.drive();
    // The last stream dies of a stream error detected by the hub itself.
    let mut m = Vec::new();
    encode_data(&mut m, cid, 9, b"gap");
    p.to_hub.push_back(m);
    p.drive();
    assert_eq!(resets(&p.hub_end, cid), [(Code::PROTOCOL_ERROR, false)]);
    assert_eq!(
        closed_code(&p.hub_end),
        Some(close::NORMAL),
        "drained session must close at once"
    );
}

#[test]
fn goaway_with_no_streams_closes_at_once() {
    let mut p = Pair::connected();
    p.hub.goaway(p.now, Code::SHUTDOWN, "bye");
    p.drive();
    assert_eq!(closed_code(&p.hub_end), Some(close::NORMAL));
    assert!(
        p.agent_end.saw(|e| matches!(e, Event::GoAway { .. })),
        "GOAWAY must still go out"
    );
}

#[test]
fn drain_grace_expiry_resets_shutdown_and_closes() {
    let hub_cfg = Config {
        shutdown_grace: secs(5),
        ..Config::default()
    };
    let mut p = Pair::connected_with(hub_cfg, Config::default());
    let cid = p.open("ldap");
    p.drive();
    p.hub.goaway(p.now, Code::SHUTDOWN, "bye");
    p.advance(ms(4_999));
    assert_eq!(p.hub.close_reason(), None);
    p.advance(ms(1));
    assert_eq!(resets(&p.hub_end, cid), [(Code::SHUTDOWN, false)]);
    assert_eq!(resets(&p.agent_end, cid), [(Code::SHUTDOWN, true)]);
    assert_eq!(closed_code(&p.hub_end), Some(close::NORMAL));
}

#[test]
fn goaway_token_expired_closes_4401_and_forbidden_4403() {
    for (code, expect) in [
        (Code::TOKEN_EXPIRED, close::TOKEN_EXPIRED),
        (Code::FORBIDDEN, close::FORBIDDEN),
    ] {
        let mut p = Pair::connected();
        let cid = p.open("ldap");
        p.drive();
        p.hub.goaway(p.now, code, "token");
        p.drive();
        assert_eq!(p.hub.close_reason(), None);
        exchange(&mut p, cid, 1000);
        assert_eq!(closed_code(&p.hub_end), Some(expect));
    }
    let mut p = Pair::connected();
    p.hub.goaway(p.now, Code::TOKEN_EXPIRED, "token");
    p.drive();
    assert_eq!(closed_code(&p.hub_end), Some(close::TOKEN_EXPIRED));
}

#[test]
fn goaway_from_agent_stops_hub_opens() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.drive();
    p.agent.goaway(p.now, Code::SHUTDOWN, "restart");
    // An OPEN crossing the GOAWAY (sent before the hub read it) is still served: it reaches the
    // agent ahead of the PONG to the fence PING behind the GOAWAY, and the hub could not retry
    // it elsewhere (the client's first bytes went with it).
    let crossing = p.open("ldap");
    p.drive();
    assert!(p
        .hub_end
        .saw(|e| matches!(e, Event::GoAway { last_cid, .. } if *last_cid == cid)));
    assert_eq!(resets(&p.hub_end, crossing), []);
    assert_eq!(
        p.hub.open(p.now, "ldap", "", None),
        Err(OpenError::Draining)
    );
    // The existing and the crossing stream complete, then the agent closes 1000.
    exchange(&mut p, crossing, 1000);
    assert_eq!(p.agent.close_reason(), None);
    exchange(&mut p, cid, 100_000);
    assert_eq!(closed_code(&p.agent_end), Some(close::NORMAL));
}

/// Frames of the messages `s` transmits now.
fn sent_frames(s: &mut Session, now: Instant) -> Vec<String> {
    let mut out = Vec::new();
    for m in drain_tx(s, now) {
        let mut at = 0;
        while at < m.len() {
            let (f, n) = nowconnect_core::frame::decode_one(&m[at..], Side::Agent, 65_536)
                .expect("agent frame");
            out.push(format!("{f:?}"));
            at += n;
        }
    }
    out
}

/// A draining agent serves OPENs until the PONG to its fence PING, then refuses them.
#[test]
fn agent_refuses_opens_after_the_fence() {
    let mut agent = raw_agent(Config::default());
    agent.goaway(t(2), Code::SHUTDOWN, "restart");
    let sent = sent_frames(&mut agent, t(2));
    assert!(sent[0].starts_with("GoAway"), "{sent:?}");
    let opaque = match sent.get(1).map(String::as_str) {
        Some(p) if p.starts_with("Ping") => p
            .trim_start_matches("Ping { opaque: ")
            .trim_end_matches(" }")
            .parse::<u64>()
            .expect("opaque"),
        other => panic!("no fence PING behind GOAWAY: {other:?}"),
    };
    // Crossing the GOAWAY: served.
    agent.handle_message(t(3), &open_frame(1));
    assert!(drain_events(&mut agent)
        .iter()
        .any(|e| matches!(e, Event::OpenRequest { cid: 1, .. })));
    // The fence's PONG, then another OPEN: refused.
    agent.handle_message(t(4), &msg(&Frame::Pong { opaque }));
    agent.handle_message(t(4), &open_frame(2));
    let sent = sent_frames(&mut agent, t(4));
    assert!(
        sent.iter().any(|f| f.starts_with("Rst { cid: 2, code: 10")),
        "{sent:?}"
    );
    assert_eq!(agent.close_reason(), None, "stream 1 is still open");
    agent.check_invariants().expect("invariants");
}

/// The agent's drain does not finish before its fence PING is answered: an OPEN still on its
/// way must not meet a closed session.
#[test]
fn agent_drain_waits_for_the_fence() {
    let mut p = Pair::connected();
    p.hold_to_agent = true;
    let now = p.now;
    p.agent.goaway(now, Code::SHUTDOWN, "restart");
    p.drive();
    // No streams, but the PONG has not come back: still open.
    assert_eq!(p.agent.close_reason(), None);
    p.hold_to_agent = false;
    p.drive();
    assert_eq!(closed_code(&p.agent_end), Some(close::NORMAL));
}

#[test]
fn hub_open_is_limited_by_agent_max_streams() {
    let agent_cfg = Config {
        max_streams: 2,
        ..Config::default()
    };
    let mut p = Pair::connected_with(Config::default(), agent_cfg);
    let a = p.open("ldap");
    p.open("ldap");
    assert_eq!(
        p.hub.open(p.now, "ldap", "", None),
        Err(OpenError::TooManyStreams)
    );
    p.drive();
    exchange(&mut p, a, 10);
    assert!(p.hub.open(p.now, "ldap", "", None).is_ok());
}

#[test]
fn agent_over_its_limit_answers_refused_stream() {
    let mut agent = raw_agent(Config {
        max_streams: 1,
        ..Config::default()
    });
    agent.handle_message(t(1), &open_frame(1));
    agent.handle_message(t(2), &open_frame(2));
    let events = drain_events(&mut agent);
    assert!(
        matches!(events[..], [Event::OpenRequest { cid: 1, .. }]),
        "{events:?}"
    );
    let out = drain_tx(&mut agent, t(2));
    let frames: Vec<Frame<'_>> = out
        .iter()
        .flat_map(|m| decode_message(m, Side::Agent, 65_536).unwrap())
        .collect();
    assert!(
        frames.iter().any(
            |f| matches!(f, Frame::Rst { cid: 2, code, .. } if *code == Code::REFUSED_STREAM.0)
        ),
        "{frames:?}"
    );
    assert!(agent.is_established());
    assert_eq!(agent.active_streams(), 1);
    // Pipelined DATA for the refused stream is ignored, not a session error.
    let mut m = Vec::new();
    encode_data(&mut m, 2, 0, b"x");
    agent.handle_message(t(3), &m);
    assert!(agent.is_established());
}

#[test]
fn renew_and_health_pass_through_as_events() {
    let mut p = Pair::connected();
    p.agent.renew(p.now, "eyJ.fresh.token");
    p.drive();
    assert!(p
        .hub_end
        .saw(|e| matches!(e, Event::Renew { token } if token == "eyJ.fresh.token")));
    p.hub.renew_ack(p.now, 1_900_000_000);
    p.drive();
    assert!(p
        .agent_end
        .saw(|e| matches!(e, Event::RenewAck { exp: 1_900_000_000 })));

    let mut report = HealthReport::default();
    report.connectors.insert(
        "ldap".into(),
        ConnectorHealth {
            healthy: true,
            backends: vec![BackendHealth {
                addr: "dc1:389".into(),
                ok: true,
                rtt_ms: Some(2),
                error: None,
            }],
        },
    );
    p.agent.send_health(p.now, &report);
    p.drive();
    assert!(p
        .hub_end
        .saw(|e| matches!(e, Event::Health(h) if *h == report)));
    assert_alive(&p);
}

// ===== §1 messages, §10 sticky close =====

#[test]
fn text_message_closes_4400() {
    let mut p = Pair::connected();
    p.hub.handle_text_message(p.now);
    p.agent.handle_text_message(p.now);
    p.drive();
    assert_eq!(closed_code(&p.hub_end), Some(close::PROTOCOL_ERROR));
    assert_eq!(closed_code(&p.agent_end), Some(close::PROTOCOL_ERROR));
}

#[test]
fn message_over_max_message_closes_4400() {
    // PONG frames are 17 bytes; an unsolicited PONG is ignored, so only the size matters.
    let hub_cfg = Config {
        max_message: 17 * 100,
        ..Config::default()
    };
    let mut p = Pair::connected_with(hub_cfg, Config::default());
    let pongs = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                msg(&Frame::Pong {
                    opaque: 1000 + i as u64,
                })
            })
            .collect()
    };
    p.to_hub.push_back(pongs(100));
    p.drive();
    assert_alive(&p);
    p.to_hub.push_back(pongs(101));
    p.drive();
    assert_eq!(closed_code(&p.hub_end), Some(close::PROTOCOL_ERROR));
}

#[test]
fn data_over_max_frame_closes_4400() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.drive();
    let mut m = Vec::new();
    encode_data(&mut m, cid, 0, &pattern(1, 65_537));
    p.to_agent.push_back(m);
    p.drive();
    assert_eq!(closed_code(&p.agent_end), Some(close::PROTOCOL_ERROR));
}

#[test]
fn close_is_sticky() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.send_all(Side::Hub, cid, b"abc");
    p.drive();
    p.send(Side::Hub, cid, b"queued but never sent");
    p.hub.handle_text_message(p.now);
    let events = drain_events(&mut p.hub);
    assert!(matches!(
        events.last(),
        Some(Event::SessionClosed { code: 4400, .. })
    ));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Reset { cid: c, .. } if *c == cid)));
    // Nothing new comes out: no DATA, no events, no timers — whatever goes in.
    let leftovers = drain_tx(&mut p.hub, p.now);
    for m in &leftovers {
        for f in decode_message(m, Side::Hub, 65_536).unwrap() {
            assert!(!matches!(f, Frame::Data { .. }), "DATA after close");
        }
    }
    let now = p.now + secs(100);
    let ping = msg(&Frame::Ping { opaque: 1 });
    p.hub.handle_message(now, &ping);
    p.hub.handle_message(now, &[0xff; 3]);
    p.hub.handle_text_message(now);
    p.hub.handle_timeout(now);
    assert_eq!(p.hub.open(now, "ldap", "", None), Err(OpenError::Closed));
    assert_eq!(p.hub.send(now, cid, b"x"), 0);
    p.hub.finish(now, cid);
    p.hub.reset(now, cid, Code::INTERNAL, "x");
    p.hub.release(now, cid, 3);
    p.hub.goaway(now, Code::SHUTDOWN, "x");
    p.hub.renew_ack(now, 1);
    p.hub.close(now, 4503, "again");
    assert!(drain_tx(&mut p.hub, now).is_empty());
    assert!(p.hub.poll_event().is_none());
    assert_eq!(p.hub.poll_timeout(), None);
    assert_eq!(
        p.hub.close_reason().map(|c| c.0),
        Some(close::PROTOCOL_ERROR)
    );
    assert!(!p.hub.is_established());
    assert_eq!(p.hub.active_streams(), 0);
    p.hub.check_invariants().unwrap();
}

#[test]
fn advertised_window_above_max_credit_is_rejected() {
    // §4: credit may never exceed 2^31−1, so an initial window above it cannot be honoured.
    let mut p = Pair::new(Config::default(), Config::default());
    p.cut_to_hub = true;
    p.drive();
    p.cut_to_hub = false;
    let h = Hello {
        window: u32::MAX,
        ..hello(&["ldap"])
    };
    p.inject(Side::Agent, &Frame::Hello(h));
    p.drive();
    let (code, reason) = p.hub.close_reason().unwrap();
    assert_eq!(code, close::PROTOCOL_ERROR);
    assert!(reason.contains("window"), "{reason}");

    let mut agent = Session::new_agent(Config::default(), hello(&["ldap"]), t(0));
    let _ = drain_tx(&mut agent, t(0));
    let ack = HelloAck {
        window: MAX_CREDIT + 1,
        max_frame: 65_536,
        ..test_ack()
    };
    agent.handle_message(t(1), &msg(&Frame::HelloAck(ack)));
    let (code, reason) = agent.close_reason().unwrap();
    assert_eq!(code, close::PROTOCOL_ERROR);
    assert!(reason.contains("window"), "{reason}");

    // Exactly 2^31−1 is fine.
    let mut agent = Session::new_agent(Config::default(), hello(&["ldap"]), t(0));
    let _ = drain_tx(&mut agent, t(0));
    let ack = HelloAck {
        window: MAX_CREDIT,
        max_frame: 65_536,
        ..test_ack()
    };
    agent.handle_message(t(1), &msg(&Frame::HelloAck(ack)));
    assert!(agent.is_established());
    agent.handle_message(t(1), &open_frame(1));
    agent.accept_stream(t(1), 1, "");
    assert_eq!(agent.send_credit(1), Some(u64::from(MAX_CREDIT)));
    agent.check_invariants().unwrap();
}

/// Regression (fuzz target `pair`): with more control frames queued than one message holds, a
/// FIN or DATA small enough to fit behind the partial control flush overtook the OPEN (hub) or
/// OPEN_OK (agent) still queued, and the peer closed the session with 4400 "frame for a stream
/// never opened". Stream frames now leave only after every queued control frame.
#[test]
fn stream_frames_never_overtake_queued_control_frames() {
    let small = Config {
        max_message: 256,
        ..Config::default()
    };
    // Control frames of many sizes, so that for some the room left in the full message fits a
    // DATA or FIN but not the next control frame.
    for digits in 0..16u32 {
        // Hub: RENEW_ACKs (more than a message holds) ahead of an OPEN, then DATA and FIN.
        let mut p = Pair::connected_with(small.clone(), small.clone());
        let now = p.now;
        for _ in 0..40 {
            p.hub.renew_ack(now, 10u64.pow(digits));
        }
        let cid = p.open("ldap");
        assert_eq!(p.hub.send(now, cid, b"x"), 1);
        p.hub.finish(now, cid);
        p.drive();
        assert_alive(&p);
        assert_eq!(p.received(Side::Agent, cid), b"x");

        // Agent: HEALTH frames ahead of an OPEN_OK, then DATA and FIN.
        let mut p = Pair::connected_with(small.clone(), small.clone());
        p.auto_accept = false;
        let cid = p.open("ldap");
        p.drive();
        let now = p.now;
        let mut report = HealthReport::default();
        report.connectors.insert(
            "c".repeat(digits as usize + 1),
            ConnectorHealth {
                healthy: true,
                backends: Vec::new(),
            },
        );
        for _ in 0..20 {
            p.agent.send_health(now, &report);
        }
        p.agent.accept_stream(now, cid, "target:1");
        assert_eq!(p.agent.send(now, cid, b"y"), 1);
        p.agent.finish(now, cid);
        p.drive();
        assert_alive(&p);
        assert_eq!(p.received(Side::Hub, cid), b"y");
    }
}

// ----- buffers: owned sends, shared receives -----

#[test]
fn send_vec_queues_owned_buffers_in_order_and_returns_them_for_reuse() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.drive();
    let big_a = pattern(1, 65_536);
    let big_b = pattern(2, 70_000);
    let small = pattern(3, 10);
    let copied = pattern(4, 3_000);
    let now = p.now;
    // Owned buffers with exactly their length as capacity, as a driver's read buffers are.
    let owned = |d: &[u8]| {
        let mut v = Vec::with_capacity(d.len());
        v.extend_from_slice(d);
        v
    };
    assert_eq!(p.hub.send_vec(now, cid, owned(&big_a)), big_a.len());
    assert_eq!(p.hub.send(now, cid, &copied), copied.len());
    assert_eq!(p.hub.send_vec(now, cid, owned(&small)), small.len());
    assert_eq!(p.hub.send_vec(now, cid, owned(&big_b)), big_b.len());
    assert!(p.hub.take_spare_buffer().is_none(), "nothing framed yet");
    p.drive();
    let want = [&big_a[..], &copied, &small, &big_b].concat();
    assert_eq!(p.received(Side::Agent, cid), &want[..]);
    // The two big buffers come back empty with their capacity, and the 16 KiB chunk the
    // copied and the small bytes were coalesced into; the small Vec itself was freed.
    let mut caps = Vec::new();
    while let Some(buf) = p.hub.take_spare_buffer() {
        assert!(buf.is_empty());
        caps.push(buf.capacity());
    }
    caps.sort_unstable();
    assert_eq!(caps, [16_384, 65_536, 70_000]);
}

#[test]
fn send_vec_beyond_capacity_takes_what_fits_and_spares_are_bounded() {
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.drive();
    p.stall(Side::Agent, cid);
    let cap = p.hub.send_capacity(cid);
    let now = p.now;
    let data = pattern(7, cap + 1000);
    assert_eq!(p.hub.send_vec(now, cid, data.clone()), cap);
    p.drive();
    assert_eq!(p.received(Side::Agent, cid), &data[..cap]);

    // Many full buffers framed: the session keeps a few for reuse, not all of them.
    let mut p = Pair::connected();
    let cid = p.open("ldap");
    p.drive();
    for i in 0..40u8 {
        let now = p.now;
        let chunk = pattern(i, 8192);
        assert_eq!(p.hub.send_vec(now, cid, chunk), 8192);
        p.drive();
    }
    let mut spares = 0;
    while p.hub.take_spare_buffer().is_some() {
        spares += 1;
    }
    assert!((1..=16).contains(&spares), "{spares} spare buffers kept");
}

#[test]
fn handle_message_bytes_hands_out_slices_of_the_message() {
    let mut p = Pair::connected_with(
        Config {
            max_frame: 4096,
            ..Config::default()
        },
        Config {
            max_frame: 4096,
            ..Config::default()
        },
    );
    let cid = p.open("ldap");
    p.drive();
    let data = pattern(9, 10_000);
    p.hold_to_agent = true;
    assert_eq!(p.send(Side::Hub, cid, &data), data.len());
    p.drive();
    let msgs: Vec<Vec<u8>> = p.to_agent.drain(..).collect();
    assert_eq!(msgs.len(), 1, "one message of three DATA frames");
    let msg = nowconnect_core::Bytes::from(msgs[0].clone());
    let now = p.now;
    p.agent.handle_message_bytes(now, msg.clone());
    let mut got = Vec::new();
    let mut events = 0;
    while let Some(ev) = p.agent.poll_event() {
        if let Event::Data { cid: c, data } = ev {
            assert_eq!(c, cid);
            let range = msg.as_ptr() as usize..msg.as_ptr() as usize + msg.len();
            assert!(range.contains(&(data.as_ptr() as usize)), "payload copied");
            got.extend_from_slice(&data);
            events += 1;
        }
    }
    assert_eq!(events, 3);
    assert_eq!(got, data);
    // The slice path copies: same bytes, not inside the message.
    let mut q = Pair::connected();
    let cid = q.open("ldap");
    q.drive();
    q.hold_to_agent = true;
    assert_eq!(q.send(Side::Hub, cid, &data), data.len());
    q.drive();
    let msg = q.to_agent.pop_front().unwrap();
    let now = q.now;
    q.agent.handle_message(now, &msg);
    let Some(Event::Data { data: copy, .. }) = q.agent.poll_event() else {
        panic!("no DATA event");
    };
    assert_eq!(&copy[..], &data[..]);
    let range = msg.as_ptr() as usize..msg.as_ptr() as usize + msg.len();
    assert!(!range.contains(&(copy.as_ptr() as usize)));
}
