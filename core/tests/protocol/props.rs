//! Property tests: random operation sequences on a [`Pair`] — several streams, sends of random
//! sizes from both sides, finishes, resets, stalled consumers, time advances below the
//! heartbeat, occasional GOAWAY — deliver every stream's bytes in order and exactly once, and
//! both sessions' invariants hold after every step (`Pair::check`).

// STYLE.md habit 10: `unwrap_used` applies outside tests.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;

use nowconnect_core::testing::{Endpoint, Pair};
use nowconnect_core::{Code, Config, Duration, Event, Side};

#[derive(Debug, Clone)]
enum Op {
    /// Hub opens a stream (idle timeout in seconds, if any).
    Open {
        idle_s: Option<u64>,
    },
    /// Agent connects the target of a stream (matters when `auto_accept` is off).
    Accept(usize),
    Send {
        side: Side,
        stream: usize,
        len: usize,
    },
    Finish {
        side: Side,
        stream: usize,
    },
    Reset {
        side: Side,
        stream: usize,
    },
    Stall {
        side: Side,
        stream: usize,
    },
    Unstall {
        side: Side,
        stream: usize,
    },
    /// Virtual time moves on (less than a heartbeat at once), timers run, the pair is driven.
    /// Held messages can still make a side declare the other dead: that is allowed too.
    Advance {
        ms: u64,
    },
    Drive,
    GoAway {
        side: Side,
    },
    /// Messages `side` sends stay on the wire (in order) until `Deliver`: latency, so resets,
    /// FINs, WINDOWs and GOAWAYs cross what the other side is doing.
    Hold {
        side: Side,
    },
    Deliver {
        side: Side,
    },
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Hub), Just(Side::Agent)]
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![3 => 1usize..200, 2 => 200usize..40_000];
    // Weights out of 213: a GOAWAY turns up in about a third of the cases, late in most.
    prop_oneof![
        18 => proptest::option::of(2u64..30).prop_map(|idle_s| Op::Open { idle_s }),
        6 => any::<usize>().prop_map(Op::Accept),
        72 => (side(), any::<usize>(), len).prop_map(|(side, stream, len)| Op::Send { side, stream, len }),
        12 => (side(), any::<usize>()).prop_map(|(side, stream)| Op::Finish { side, stream }),
        6 => (side(), any::<usize>()).prop_map(|(side, stream)| Op::Reset { side, stream }),
        12 => (side(), any::<usize>()).prop_map(|(side, stream)| Op::Stall { side, stream }),
        12 => (side(), any::<usize>()).prop_map(|(side, stream)| Op::Unstall { side, stream }),
        18 => (0u64..6_000).prop_map(|ms| Op::Advance { ms }),
        18 => Just(Op::Drive),
        1 => side().prop_map(|side| Op::GoAway { side }),
        8 => side().prop_map(|side| Op::Hold { side }),
        10 => side().prop_map(|side| Op::Deliver { side }),
    ]
}

#[derive(Debug, Clone)]
struct Setup {
    hub: Config,
    agent: Config,
    auto_accept: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![Just(1024u32), Just(4096), Just(65_536)],
        prop_oneof![Just(256u32), Just(1024), Just(16_384)],
        prop_oneof![Just(1u32), Just(4), Just(16)],
        prop_oneof![Just(2048usize), Just(1024 * 1024)],
        2u32..6,
        proptest::option::of(3u64..40),
        1u64..20,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                window,
                max_frame,
                growth,
                max_message,
                max_streams,
                agent_idle,
                grace,
                auto_accept,
                tight,
            )| {
                let base = Config {
                    window,
                    max_window: window * growth,
                    // A tight budget makes auto-tuning compete for it.
                    max_buffered: if tight { u64::from(window) } else { 1 << 26 },
                    max_frame,
                    max_message,
                    max_streams,
                    shutdown_grace: Duration::from_secs(grace),
                    idle_timeout: None,
                    ..Config::default()
                };
                let agent = Config {
                    // The agent's own window differs, so each direction has its own credit.
                    window: window * 2,
                    max_window: window * 2 * growth,
                    idle_timeout: agent_idle.map(Duration::from_secs),
                    ..base.clone()
                };
                Setup {
                    hub: base,
                    agent,
                    auto_accept,
                }
            },
        )
}

/// Byte `offset` of what `side` sends on `cid`: position-dependent, so loss, duplication and
/// reordering all show.
fn byte(side: Side, cid: u32, offset: usize) -> u8 {
    let s = if side == Side::Hub { 0x5a } else { 0xa5 };
    (offset as u32)
        .wrapping_mul(2_654_435_761)
        .wrapping_add(cid.wrapping_mul(40_503))
        .rotate_left(13) as u8
        ^ s
        ^ (offset >> 11) as u8
}

struct Model {
    cids: Vec<u32>,
    /// Bytes each side's session accepted per stream.
    sent: BTreeMap<(bool, u32), Vec<u8>>,
}

fn key(side: Side, cid: u32) -> (bool, u32) {
    (side == Side::Hub, cid)
}

impl Model {
    /// The stream `i` selects among those opened so far.
    fn pick(&self, i: usize) -> Option<u32> {
        (!self.cids.is_empty()).then(|| self.cids[i % self.cids.len()])
    }
}

fn set_hold(p: &mut Pair, from: Side, hold: bool) {
    match from {
        Side::Hub => p.hold_to_agent = hold,
        Side::Agent => p.hold_to_hub = hold,
    }
}

fn saw_reset(end: &Endpoint, cid: u32) -> bool {
    end.saw(|e| matches!(e, Event::Reset { cid: c, .. } if *c == cid))
}

fn saw_finished(end: &Endpoint, cid: u32) -> bool {
    end.saw(|e| matches!(e, Event::Finished { cid: c } if *c == cid))
}

fn saw_closed(end: &Endpoint, cid: u32) -> bool {
    end.saw(|e| matches!(e, Event::StreamClosed { cid: c } if *c == cid))
}

/// In order and exactly once: what arrived is a prefix of what was sent; all of it once the
/// receiver saw FIN (FIN follows the last DATA).
fn check_delivery(p: &mut Pair, m: &Model) -> Result<(), TestCaseError> {
    for &cid in &m.cids {
        for from in [Side::Hub, Side::Agent] {
            let to = from.peer();
            let sent = m
                .sent
                .get(&key(from, cid))
                .map_or(&[][..], |v| v.as_slice());
            let got = p.received(to, cid).to_vec();
            prop_assert!(
                sent.starts_with(&got),
                "cid {cid} {from:?}→{to:?}: received {} bytes, not a prefix of the {} sent",
                got.len(),
                sent.len()
            );
            if saw_finished(p.end(to), cid) {
                prop_assert_eq!(
                    got.len(),
                    sent.len(),
                    "cid {} {:?}: FIN before all data",
                    cid,
                    to
                );
            }
        }
    }
    Ok(())
}

fn run(setup: Setup, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut p = Pair::connected_with(setup.hub, setup.agent);
    p.auto_accept = setup.auto_accept;
    let mut m = Model {
        cids: Vec::new(),
        sent: BTreeMap::new(),
    };
    let mut buf = Vec::new();
    for op in ops {
        let now = p.now;
        match op {
            Op::Open { idle_s } => {
                let idle = idle_s.map(Duration::from_secs);
                if let Ok(cid) = p.hub.open(now, "ldap", "192.0.2.1:4000", idle) {
                    m.cids.push(cid);
                }
            }
            Op::Accept(i) => {
                if let Some(cid) = m.pick(i) {
                    p.agent.accept_stream(now, cid, "target:1");
                }
            }
            Op::Send { side, stream, len } => {
                if let Some(cid) = m.pick(stream) {
                    let sent = m.sent.entry(key(side, cid)).or_default();
                    let off = sent.len();
                    buf.clear();
                    buf.extend((off..off + len).map(|o| byte(side, cid, o)));
                    let n = p.send(side, cid, &buf);
                    prop_assert!(n <= len);
                    sent.extend_from_slice(&buf[..n]);
                }
            }
            Op::Finish { side, stream } => {
                if let Some(cid) = m.pick(stream) {
                    p.finish(side, cid);
                }
            }
            Op::Reset { side, stream } => {
                if let Some(cid) = m.pick(stream) {
                    p.reset(side, cid, Code::RESET_BY_PEER);
                }
            }
            Op::Stall { side, stream } => {
                if let Some(cid) = m.pick(stream) {
                    p.stall(side, cid);
                }
            }
            Op::Unstall { side, stream } => {
                if let Some(cid) = m.pick(stream) {
                    p.unstall(side, cid);
                }
            }
            Op::Advance { ms } => p.advance(Duration::from_millis(ms)),
            Op::Drive => p.drive(),
            Op::GoAway { side } => {
                p.session(side).goaway(now, Code::SHUTDOWN, "prop");
            }
            Op::Hold { side } => set_hold(&mut p, side, true),
            Op::Deliver { side } => set_hold(&mut p, side, false),
        }
        // Invariants of both sides are checked inside every step (`Pair::check`).
        p.step();
        check_delivery(&mut p, &m)?;
    }

    // Every consumer reads again; what is in flight arrives.
    set_hold(&mut p, Side::Hub, false);
    set_hold(&mut p, Side::Agent, false);
    for &cid in &m.cids {
        p.unstall(Side::Hub, cid);
        p.unstall(Side::Agent, cid);
    }
    p.drive();
    check_delivery(&mut p, &m)?;

    // Streams that are still healthy have lost nothing, and close cleanly once both finish.
    if p.hub.close_reason().is_some() || p.agent.close_reason().is_some() {
        return Ok(());
    }
    let live: Vec<u32> = m
        .cids
        .iter()
        .copied()
        .filter(|&c| {
            p.hub.recv_window(c).is_some()
                && p.agent.recv_window(c).is_some()
                && p.hub_end
                    .saw(|e| matches!(e, Event::Opened { cid, .. } if *cid == c))
        })
        .collect();
    for &cid in &live {
        for from in [Side::Hub, Side::Agent] {
            let sent = m.sent.get(&key(from, cid)).map_or(0, Vec::len);
            prop_assert_eq!(
                p.received(from.peer(), cid).len(),
                sent,
                "cid {} from {:?}: bytes stuck",
                cid,
                from
            );
        }
        p.finish(Side::Hub, cid);
        p.finish(Side::Agent, cid);
    }
    p.drive();
    check_delivery(&mut p, &m)?;
    for &cid in &live {
        prop_assert!(
            saw_closed(&p.hub_end, cid) && saw_closed(&p.agent_end, cid),
            "cid {cid} did not close cleanly"
        );
        prop_assert!(!saw_reset(&p.hub_end, cid) && !saw_reset(&p.agent_end, cid));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_deliver_in_order_exactly_once(
        setup in setup(),
        ops in proptest::collection::vec(op(), 1..160),
    ) {
        run(setup, ops)?;
    }
}

/// A fixed mixed workload (no randomness), so a regression shows even without proptest's seed.
#[test]
fn mixed_workload_delivers_everything() {
    let setup = Setup {
        hub: Config {
            window: 4096,
            max_window: 65_536,
            max_frame: 1024,
            ..Config::default()
        },
        agent: Config {
            window: 8192,
            max_frame: 1024,
            ..Config::default()
        },
        auto_accept: true,
    };
    let mut ops = vec![
        Op::Open { idle_s: None },
        Op::Open { idle_s: None },
        Op::Open { idle_s: Some(5) },
    ];
    for i in 0..60 {
        let side = if i % 2 == 0 { Side::Hub } else { Side::Agent };
        ops.push(Op::Send {
            side,
            stream: i % 7,
            len: 1 + (i * 997) % 30_000,
        });
        if i % 9 == 0 {
            ops.push(Op::Stall {
                side: side.peer(),
                stream: i % 5,
            });
        }
        if i % 11 == 0 {
            ops.push(Op::Unstall {
                side: side.peer(),
                stream: i % 5,
            });
            ops.push(Op::Advance { ms: 700 });
        }
    }
    run(setup, ops).unwrap();
}
