//! [`FakePdp`]: an in-process policy decision point over plain HTTP on loopback (a real PDP
//! cannot run here). Answers are programmable per connector (allow, deny, an HTTP status, a
//! raw body, a delay, or held until [`FakePdp::release`]); it can go down (connection refused)
//! and come back on the same port; it records every request and counts those in flight.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The path the PDP answers on.
pub const PDP_PATH: &str = "/v1/authorize";

/// Largest request the fake reads (head + body).
const MAX_REQUEST: usize = 64 * 1024;

/// How the fake answers one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Response body.
    pub body: String,
    /// Sleep this long before answering.
    pub delay: Duration,
    /// Wait for [`FakePdp::release`] before answering.
    pub held: bool,
}

impl Answer {
    /// `200 {"allow": true}`.
    pub fn allow() -> Answer {
        Answer::json(r#"{"allow": true}"#)
    }

    /// `200 {"allow": false}`.
    pub fn deny() -> Answer {
        Answer::json(r#"{"allow": false}"#)
    }

    /// `200` with `body` as JSON (possibly malformed, on purpose).
    pub fn json(body: &str) -> Answer {
        Answer {
            status: 200,
            body: body.into(),
            delay: Duration::ZERO,
            held: false,
        }
    }

    /// `status` with an `{"allow": true}` body (which must not count: the status is an error).
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            ..Answer::allow()
        }
    }

    /// This answer after `delay`.
    pub fn delayed(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }

    /// This answer once [`FakePdp::release`] is called.
    pub fn held(mut self) -> Answer {
        self.held = true;
        self
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct PdpCall {
    pub method: String,
    pub path: String,
    /// `Content-Type` header.
    pub content_type: Option<String>,
    /// The body as JSON (`Value::Null` when it was not JSON).
    pub body: Value,
    pub at: Instant,
}

impl PdpCall {
    /// A string field of the body (`""` when absent).
    pub fn field(&self, name: &str) -> &str {
        self.body.get(name).and_then(Value::as_str).unwrap_or("")
    }
}

struct State {
    default: Answer,
    per_connector: HashMap<String, Answer>,
    calls: Vec<PdpCall>,
    /// Connector names of requests received and not yet answered.
    in_flight: Vec<String>,
    released: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Server {
    stop: Arc<AtomicBool>,
    accept: JoinHandle<()>,
}

/// A fake PDP on `127.0.0.1:<port>`; every path answers like [`PDP_PATH`]. Stops on drop.
pub struct FakePdp {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<Server>>,
}

impl FakePdp {
    /// Starts answering `answer` to every request.
    pub fn start(answer: Answer) -> FakePdp {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, crate::free_port())).expect("bind fake PDP");
        let addr = listener.local_addr().expect("fake PDP addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                default: answer,
                per_connector: HashMap::new(),
                calls: Vec::new(),
                in_flight: Vec::new(),
                released: false,
            }),
            changed: Condvar::new(),
        });
        let pdp = FakePdp {
            addr,
            shared,
            server: Mutex::new(None),
        };
        pdp.serve(listener);
        pdp
    }

    /// `http://127.0.0.1:<port>/v1/authorize`.
    pub fn url(&self) -> String {
        format!("http://{}{PDP_PATH}", self.addr)
    }

    /// The `authz:` section of a hub.yaml using this PDP.
    pub fn authz_yaml(&self, timeout: &str, cache_ttl: &str, on_error: &str) -> String {
        format!(
            "authz:\n  pdp:\n    url: {}\n    timeout: {timeout}\n    cache_ttl: {cache_ttl}\n    \
             on_error: {on_error}\n",
            self.url()
        )
    }

    /// The answer for connectors without their own.
    pub fn set_default(&self, answer: Answer) {
        self.shared.lock().default = answer;
    }

    /// The answer for requests about `connector`.
    pub fn set_for(&self, connector: &str, answer: Answer) {
        self.shared
            .lock()
            .per_connector
            .insert(connector.into(), answer);
    }

    /// Answers every held request (and those that come later).
    pub fn release(&self) {
        self.shared.lock().released = true;
        self.shared.changed.notify_all();
    }

    /// Every request so far, oldest first.
    pub fn calls(&self) -> Vec<PdpCall> {
        self.shared.lock().calls.clone()
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.shared.lock().calls.len()
    }

    /// Requests about `connector` received and not answered yet.
    pub fn in_flight(&self, connector: &str) -> usize {
        self.shared
            .lock()
            .in_flight
            .iter()
            .filter(|c| *c == connector)
            .count()
    }

    /// Waits until [`Self::count`] is at least `n`; returns whether it got there.
    pub fn wait_count(&self, n: usize, timeout: Duration) -> bool {
        crate::wait_until(timeout, || self.count() >= n)
    }

    /// Down: the port is closed, so the hub's connects are refused. Up: listening again on the
    /// same port.
    pub fn set_down(&self, down: bool) {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if down {
            if let Some(s) = server.take() {
                s.stop.store(true, Ordering::SeqCst);
                let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
                let _ = s.accept.join();
            }
        } else if server.is_none() {
            drop(server);
            // std sets SO_REUSEADDR, so the port can be taken again at once.
            let listener = TcpListener::bind(self.addr).expect("re-bind fake PDP");
            self.serve(listener);
        }
    }

    fn serve(&self, listener: TcpListener) {
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = stop.clone();
            let shared = self.shared.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let shared = shared.clone();
                    std::thread::spawn(move || handle(conn, &shared));
                }
            })
        };
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(Server { stop, accept });
    }
}

impl Drop for FakePdp {
    fn drop(&mut self) {
        // Held requests are answered so their threads end.
        self.release();
        self.set_down(true);
    }
}

fn handle(mut conn: TcpStream, shared: &Shared) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let Some(req) = crate::http::read_request(&mut conn, MAX_REQUEST) else {
        return;
    };
    let content_type = req.header("content-type").map(str::to_owned);
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let (method, path) = (req.method, req.path);
    let connector = body
        .get("connector")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let answer = {
        let mut st = shared.lock();
        st.calls.push(PdpCall {
            method,
            path,
            content_type,
            body,
            at: Instant::now(),
        });
        st.in_flight.push(connector.clone());
        st.per_connector
            .get(&connector)
            .cloned()
            .unwrap_or_else(|| st.default.clone())
    };
    if answer.held {
        let mut st = shared.lock();
        while !st.released {
            st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
    std::thread::sleep(answer.delay);
    let response = format!(
        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{}",
        answer.status,
        answer.body.len(),
        answer.body
    );
    let _ = conn.write_all(response.as_bytes());
    let _ = conn.flush();
    let mut st = shared.lock();
    if let Some(i) = st.in_flight.iter().position(|c| *c == connector) {
        st.in_flight.remove(i);
    }
}
