//! Test harness: a hub [`Session`] and an agent [`Session`] joined in memory, with a virtual
//! clock (STYLE.md habit 7). Used by the scripted tests, property tests, fuzz targets and the
//! micro-benchmark. Enabled by `cfg(test)` or the `testing` feature.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use core::time::Duration;

use crate::{Code, Config, Event, Frame, Hello, HelloAck, Instant, Rejected, Session, Side};

/// What one side of a [`Pair`] saw and received.
#[derive(Debug, Default)]
pub struct Endpoint {
    /// Every event except `Data`, in order.
    pub events: Vec<Event>,
    /// Bytes received per stream, in delivery order.
    pub received: BTreeMap<u32, Vec<u8>>,
    /// Bytes received but not yet released (the "socket" has not consumed them).
    pub unreleased: BTreeMap<u32, usize>,
    /// Streams whose consumer is stalled: their bytes are not released.
    pub stalled: BTreeSet<u32>,
    /// Messages this side sent, and their total bytes.
    pub messages_sent: u64,
    /// Total bytes of those messages.
    pub bytes_sent: u64,
}

impl Endpoint {
    /// Whether an event matching `f` was seen.
    pub fn saw(&self, f: impl Fn(&Event) -> bool) -> bool {
        self.events.iter().any(f)
    }
}

/// Two sessions wired back to back.
#[derive(Debug)]
pub struct Pair {
    /// The hub side.
    pub hub: Session,
    /// The agent side.
    pub agent: Session,
    /// Virtual time.
    pub now: Instant,
    /// Hub observations.
    pub hub_end: Endpoint,
    /// Agent observations.
    pub agent_end: Endpoint,
    /// Messages in flight hub → agent.
    pub to_agent: VecDeque<Vec<u8>>,
    /// Messages in flight agent → hub.
    pub to_hub: VecDeque<Vec<u8>>,
    /// Agent answers OPEN with OPEN_OK at once (backend `"target:1"`).
    pub auto_accept: bool,
    /// Run `check_invariants` on both sides after every step (panics on a violation).
    pub check: bool,
    /// Keep delivered bytes in `received` (off for benchmarks).
    pub record: bool,
    /// Link cut hub → agent: everything the hub sends (or is injected that way) is dropped.
    pub cut_to_agent: bool,
    /// Link cut agent → hub: everything the agent sends (or is injected that way) is dropped.
    pub cut_to_hub: bool,
    /// Latency hub → agent: messages stay queued in `to_agent`, in order, until cleared.
    pub hold_to_agent: bool,
    /// Latency agent → hub: messages stay queued in `to_hub`, in order, until cleared.
    pub hold_to_hub: bool,
    /// Delivered messages, reused as buffers for the next ones (no copy per message).
    spare: Vec<Vec<u8>>,
}

/// A HELLO for tests.
pub fn hello(connectors: &[&str]) -> Hello {
    Hello {
        agent_id: "agent-1".into(),
        connectors: connectors.iter().map(|c| (*c).to_owned()).collect(),
        ver: 1,
        software: "nowconnect-agent/test".into(),
        window: 0,
        max_streams: 0,
    }
}

impl Pair {
    /// Two sessions with the given configs, not yet connected.
    pub fn new(hub: Config, agent: Config) -> Self {
        let now = Instant::from_millis(1_000);
        Pair {
            hub: Session::new_hub(hub, now),
            agent: Session::new_agent(agent, hello(&["ldap", "ssh"]), now),
            now,
            hub_end: Endpoint::default(),
            agent_end: Endpoint::default(),
            to_agent: VecDeque::new(),
            to_hub: VecDeque::new(),
            auto_accept: true,
            check: true,
            record: true,
            cut_to_agent: false,
            cut_to_hub: false,
            hold_to_agent: false,
            hold_to_hub: false,
            spare: Vec::new(),
        }
    }

    /// Default configs, handshake done.
    pub fn connected() -> Self {
        Self::connected_with(Config::default(), Config::default())
    }

    /// Given configs, handshake done (hub accepts every offered connector).
    pub fn connected_with(hub: Config, agent: Config) -> Self {
        let mut p = Pair::new(hub, agent);
        p.drive();
        let hello = p
            .hub_end
            .events
            .iter()
            .find_map(|e| match e {
                Event::Hello(h) => Some(h.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no HELLO reached the hub"));
        let ack = HelloAck {
            session: "s-1".into(),
            accepted: hello.connectors.clone(),
            rejected: Vec::<Rejected>::new(),
            window: 0,
            max_frame: 0,
            heartbeat_ms: 0,
            ver: 1,
        };
        p.hub.accept_hello(p.now, ack);
        p.drive();
        assert!(p.hub.is_established() && p.agent.is_established());
        p
    }

    /// The session of `side`.
    pub fn session(&mut self, side: Side) -> &mut Session {
        match side {
            Side::Hub => &mut self.hub,
            Side::Agent => &mut self.agent,
        }
    }

    /// Observations of `side`.
    pub fn end(&mut self, side: Side) -> &mut Endpoint {
        match side {
            Side::Hub => &mut self.hub_end,
            Side::Agent => &mut self.agent_end,
        }
    }

    /// Moves all pending output of both sides onto the wire, delivers it, and processes the
    /// resulting events. Returns whether anything happened.
    pub fn step(&mut self) -> bool {
        let mut moved = false;
        for side in [Side::Hub, Side::Agent] {
            moved |= self.flush(side);
            moved |= self.pump_events(side);
        }
        if self.cut_to_agent {
            self.to_agent.clear();
        }
        if self.cut_to_hub {
            self.to_hub.clear();
        }
        while !self.hold_to_agent {
            let Some(m) = self.to_agent.pop_front() else {
                break;
            };
            // The agent takes messages as `Bytes` (DATA shares them), the hub as slices
            // (DATA copied): both decode paths run in every test and fuzz case.
            self.agent
                .handle_message_bytes(self.now, bytes::Bytes::from(m));
            moved = true;
        }
        while !self.hold_to_hub {
            let Some(m) = self.to_hub.pop_front() else {
                break;
            };
            self.hub.handle_message(self.now, &m);
            self.spare.push(m);
            moved = true;
        }
        for side in [Side::Hub, Side::Agent] {
            moved |= self.pump_events(side);
        }
        if self.check {
            self.check_invariants();
        }
        moved
    }

    /// Steps until nothing moves (at most 100 000 steps).
    pub fn drive(&mut self) {
        assert!(self.drive_bounded(100_000), "pair did not go quiet");
    }

    /// Steps until quiet or `max` steps; returns whether it went quiet.
    pub fn drive_bounded(&mut self, max: usize) -> bool {
        for _ in 0..max {
            if !self.step() {
                return true;
            }
        }
        false
    }

    /// Advances virtual time by `d`, running both sides' timers, then drives.
    pub fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        // Visit every timer deadline on the way so nothing fires late.
        let mut same_instant = 0;
        loop {
            let next = [self.hub.poll_timeout(), self.agent.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|t| *t <= target)
                .min();
            let Some(t) = next else { break };
            // A timer still due after `handle_timeout` ran at its instant is a bug: fail, not hang.
            same_instant = if t <= self.now { same_instant + 1 } else { 0 };
            assert!(same_instant < 1_000, "timer due at {t:?} does not fire");
            self.now = t.max(self.now);
            self.hub.handle_timeout(self.now);
            self.agent.handle_timeout(self.now);
            self.drive();
        }
        self.now = target;
        self.hub.handle_timeout(self.now);
        self.agent.handle_timeout(self.now);
        self.drive();
    }

    fn flush(&mut self, side: Side) -> bool {
        let mut moved = false;
        let now = self.now;
        loop {
            let mut buf = self.spare.pop().unwrap_or_default();
            buf.clear();
            if !self.session(side).poll_transmit(now, &mut buf) {
                self.spare.push(buf);
                break;
            }
            moved = true;
            let end = self.end(side);
            end.messages_sent += 1;
            end.bytes_sent += buf.len() as u64;
            match side {
                Side::Hub => self.to_agent.push_back(buf),
                Side::Agent => self.to_hub.push_back(buf),
            }
        }
        moved
    }

    fn pump_events(&mut self, side: Side) -> bool {
        let mut moved = false;
        let now = self.now;
        while let Some(ev) = self.session(side).poll_event() {
            moved = true;
            match ev {
                Event::Data { cid, data } => {
                    let record = self.record;
                    let end = self.end(side);
                    if record {
                        end.received
                            .entry(cid)
                            .or_default()
                            .extend_from_slice(&data);
                    }
                    if end.stalled.contains(&cid) {
                        *end.unreleased.entry(cid).or_default() += data.len();
                    } else {
                        self.session(side).release(now, cid, data.len());
                    }
                }
                Event::OpenRequest { cid, .. } if side == Side::Agent && self.auto_accept => {
                    self.agent.accept_stream(now, cid, "target:1");
                    self.agent_end.events.push(ev);
                }
                other => self.end(side).events.push(other),
            }
        }
        moved
    }

    /// Stops `side`'s consumer of `cid` from reading: its bytes are no longer released.
    pub fn stall(&mut self, side: Side, cid: u32) {
        self.end(side).stalled.insert(cid);
    }

    /// Resumes a stalled consumer and releases what it had buffered.
    pub fn unstall(&mut self, side: Side, cid: u32) {
        let now = self.now;
        let end = self.end(side);
        end.stalled.remove(&cid);
        let n = end.unreleased.remove(&cid).unwrap_or(0);
        self.session(side).release(now, cid, n);
    }

    /// Hub opens a stream on `connector`; returns its cid (not driven).
    pub fn open(&mut self, connector: &str) -> u32 {
        let now = self.now;
        self.hub
            .open(now, connector, "127.0.0.1:40000", None)
            .unwrap_or_else(|e| panic!("open failed: {e}"))
    }

    /// Sends as much of `data` as credit allows from `side`; returns bytes accepted.
    pub fn send(&mut self, side: Side, cid: u32, data: &[u8]) -> usize {
        let now = self.now;
        // Both send paths run: the agent hands over owned buffers, the hub slices.
        match side {
            Side::Agent => self.agent.send_vec(now, cid, data.to_vec()),
            Side::Hub => self.hub.send(now, cid, data),
        }
    }

    /// Sends all of `data` from `side`, driving the pair whenever credit runs out.
    pub fn send_all(&mut self, side: Side, cid: u32, data: &[u8]) {
        let mut off = 0;
        let mut idle = 0;
        while off < data.len() {
            let n = self.send(side, cid, &data[off..]);
            off += n;
            if !self.step() && n == 0 {
                idle += 1;
                assert!(idle < 3, "send_all stuck at {off}/{} bytes", data.len());
            } else {
                idle = 0;
            }
        }
    }

    /// FIN from `side`.
    pub fn finish(&mut self, side: Side, cid: u32) {
        let now = self.now;
        self.session(side).finish(now, cid);
    }

    /// RST from `side`.
    pub fn reset(&mut self, side: Side, cid: u32, code: Code) {
        let now = self.now;
        self.session(side).reset(now, cid, code, "test reset");
    }

    /// Puts `frame`, as if sent by `from`, on the wire as a message of its own (after whatever
    /// is already queued); the next `step` delivers it. For crafting peer misbehaviour.
    pub fn inject(&mut self, from: Side, frame: &Frame<'_>) {
        let mut msg = Vec::new();
        frame.encode(&mut msg);
        match from {
            Side::Hub => self.to_agent.push_back(msg),
            Side::Agent => self.to_hub.push_back(msg),
        }
    }

    /// Panics if either side's invariants are broken.
    pub fn check_invariants(&self) {
        if let Err(e) = self.hub.check_invariants() {
            panic!("hub invariant: {e}");
        }
        if let Err(e) = self.agent.check_invariants() {
            panic!("agent invariant: {e}");
        }
    }

    /// Bytes `side` received on `cid`.
    pub fn received(&mut self, side: Side, cid: u32) -> &[u8] {
        self.end(side)
            .received
            .get(&cid)
            .map_or(&[], |v| v.as_slice())
    }
}
