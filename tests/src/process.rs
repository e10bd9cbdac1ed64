//! [`Proc`]: a child process owned by a test.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How much of a log [`Proc`] prints when a test panics.
const LOG_TAIL_BYTES: usize = 16 * 1024;

/// A child process owned by a test.
///
/// - stdout and stderr go to `<log_dir>/<name>.log` (read it with [`Proc::log`]);
/// - the child leads its own process group, so [`Proc::kill`] and drop also end whatever it
///   forked (sshd sessions, postgres backends, tinyproxy workers);
/// - drop sends the stop signal (SIGTERM unless [`Proc::set_stop_signal`]), waits up to 5 s,
///   then SIGKILLs the group; if the thread is panicking it prints the tail of the log first.
///
/// Signals go through the `kill(1)` command (procps), so no `unsafe` and no libc binding.
pub struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
    status: Option<ExitStatus>,
    stop_signal: &'static str,
}

impl Proc {
    /// Spawns `cmd` (stdin null, stdout+stderr to `<log_dir>/<name>.log`). Panics if it cannot
    /// be started. Several processes may share one `log_dir` as long as their names differ.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Proc {
        let log_path = log_dir.join(format!("{name}.log"));
        let out = File::create(&log_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        let err = out.try_clone().expect("dup log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            log_path,
            status: None,
            stop_signal: "TERM",
        }
    }

    /// The signal drop and [`Proc::stop`] send first (e.g. "INT" for postgres' fast shutdown).
    pub fn set_stop_signal(&mut self, signal: &'static str) {
        self.stop_signal = signal;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote so far (lossy UTF-8).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    /// The last `LOG_TAIL_BYTES` of the log, framed with the process name, for panic messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let mut start = log.len().saturating_sub(LOG_TAIL_BYTES);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        format!(
            "----- {} (pid {}) log {} -----\n{}\n----- end {} -----",
            self.name,
            self.pid(),
            self.log_path.display(),
            &log[start..],
            self.name
        )
    }

    /// Waits until the log contains `needle`; false on timeout or if the process exited first
    /// (and the needle never showed up).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> bool {
        crate::wait_until(timeout, || {
            self.log().contains(needle) || !self.is_running()
        });
        self.log().contains(needle)
    }

    /// Sends `signal` ("TERM", "HUP", "INT", "KILL", "USR1", ...) to the process only.
    pub fn signal(&self, signal: &str) -> std::io::Result<()> {
        send_signal(signal, &self.pid().to_string())
    }

    /// Sends `signal` to the whole process group.
    pub fn signal_group(&self, signal: &str) -> std::io::Result<()> {
        send_signal(signal, &format!("-{}", self.pid()))
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::wait_until(timeout, || self.try_status().is_some());
        self.try_status()
    }

    /// Sends the stop signal and waits up to `timeout` for a clean exit. `None` when the process
    /// did not exit in time (it is left running; drop or [`Proc::kill`] ends it).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.is_running() {
            let _ = self.signal(self.stop_signal);
        }
        self.wait_timeout(timeout)
    }

    /// [`Proc::terminate`] with 5 s of grace, then SIGKILL to the group.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(status) = self.terminate(Duration::from_secs(5)) {
            let _ = self.signal_group("KILL"); // leftovers the leader forked
            return status;
        }
        self.kill()
    }

    /// SIGKILL to the process group, then reaps the leader.
    pub fn kill(&mut self) -> ExitStatus {
        let _ = self.signal_group("KILL");
        if let Some(status) = self.try_status() {
            return status;
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for killed child");
        self.status = Some(status);
        status
    }

    /// Waits until `addr` accepts TCP connections. Panics with the log if the process exits
    /// first or `timeout` passes.
    pub fn wait_for_port(&mut self, addr: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if crate::ports::port_open(addr) {
                return;
            }
            if let Some(status) = self.try_status() {
                panic!(
                    "{} exited ({status}) before listening on {addr}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} not listening on {addr} after {timeout:?}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        if self.is_running() {
            let _ = self.signal_group(self.stop_signal);
            if self.wait_timeout(Duration::from_secs(5)).is_none() {
                eprintln!(
                    "[fixtures] {} ignored SIG{}; killing",
                    self.name, self.stop_signal
                );
            }
        }
        self.kill();
    }
}

/// `kill -s SIGNAL -- TARGET` (a pid, or `-pgid` for a group).
pub(crate) fn send_signal(signal: &str, target: &str) -> std::io::Result<()> {
    let out = Command::new("kill")
        .args(["-s", signal, "--", target])
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "kill -s {signal} {target}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
