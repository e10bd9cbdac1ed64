//! A wake-up other threads signal when they hand a thread work: an eventfd that the owner
//! polls next to its socket (DESIGN.md "Threads").

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{eventfd, EventfdFlags};

/// Pollable wake-up shared (in an `Arc`) between one owner thread and any number of signallers.
///
/// Protocol: a signaller first publishes its work (channel, atomic, mutex), then calls
/// [`wake`](Waker::wake). The owner, after `poll(2)` returns, calls [`reset`](Waker::reset)
/// *before* looking for work, so a wake racing with the drain is never lost: either the
/// owner's drain sees the work, or the eventfd stays readable for the next poll.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
    /// Set while a wake is pending: collapses a burst of wakes into one eventfd write.
    pending: AtomicBool,
}

impl Waker {
    /// A new, unsignalled wake-up (nonblocking, close-on-exec).
    pub fn new() -> io::Result<Waker> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Waker {
            fd,
            pending: AtomicBool::new(false),
        })
    }

    /// Make the owner's next (or current) poll return. Cheap when a wake is already pending.
    pub fn wake(&self) {
        // AcqRel: the owner's `reset` swap reads this value, which orders our earlier hand-off
        // (the work being published) before its drain.
        if !self.pending.swap(true, Ordering::AcqRel) {
            // The counter saturating (EAGAIN) still leaves the fd readable, which is all we need.
            let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
        }
    }

    /// Owner only: consume the pending wake. Call before draining the work queues.
    pub fn reset(&self) {
        // Read first, clear second. The other order loses wakes: a wake whose eventfd write
        // we consumed after clearing would leave `pending` set on an empty eventfd, so the next
        // signaller would skip its write and we would sleep on its work.
        let mut counter = [0u8; 8];
        // EAGAIN: nothing was written (a wake may be between its swap and its write; then the
        // eventfd turns readable later and costs one spurious turn, never a lost one).
        let _ = rustix::io::read(&self.fd, &mut counter);
        // AcqRel: reading the signallers' swaps makes their published work visible to our drain.
        self.pending.swap(false, Ordering::AcqRel);
    }
}

impl Waker {
    /// Owner only: [`reset`](Waker::reset) if a wake may be pending — the last poll saw the
    /// eventfd readable, or a signaller has claimed a wake — and skip the syscall otherwise.
    /// A wake claimed after this check still writes the eventfd, so the next poll returns.
    pub fn reset_after_poll(&self, polled_readable: bool) {
        if polled_readable || self.pending.load(Ordering::Acquire) {
            self.reset();
        }
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{poll, PollFd, PollFlags, Timespec};

    fn readable(w: &Waker) -> bool {
        let mut fds = [PollFd::new(w, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&zero)).expect("poll") == 1
    }

    #[test]
    fn wake_then_reset() {
        let w = Waker::new().expect("eventfd");
        assert!(!readable(&w));
        w.wake();
        w.wake();
        assert!(readable(&w));
        w.reset();
        assert!(!readable(&w));
        w.wake();
        assert!(readable(&w));
    }

    /// Many signallers racing with the owner's reset/drain: every item is seen without ever
    /// needing a timeout (a lost wake shows as a poll that times out with work queued).
    #[test]
    fn no_lost_wakes_under_races() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        const PRODUCERS: usize = 3;
        const ITEMS: usize = 20_000;
        let waker = Arc::new(Waker::new().expect("eventfd"));
        let queue = Arc::new(std::sync::Mutex::new(0usize));
        let pushed = Arc::new(AtomicUsize::new(0));
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let (waker, queue, pushed) = (waker.clone(), queue.clone(), pushed.clone());
                std::thread::spawn(move || {
                    for i in 0..ITEMS {
                        *queue.lock().expect("queue") += 1;
                        pushed.fetch_add(1, Ordering::SeqCst);
                        waker.wake();
                        if (i + p) % 64 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut seen = 0;
        let second = Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        while seen < PRODUCERS * ITEMS {
            waker.reset();
            seen += std::mem::take(&mut *queue.lock().expect("queue"));
            if seen == PRODUCERS * ITEMS {
                break;
            }
            let mut fds = [PollFd::new(&*waker, PollFlags::IN)];
            let ready = poll(&mut fds, Some(&second)).expect("poll");
            let queued = *queue.lock().expect("queue");
            assert!(
                ready == 1 || queued == 0,
                "lost wake: {queued} items queued"
            );
        }
        for p in producers {
            p.join().expect("producer");
        }
        assert_eq!(pushed.load(Ordering::SeqCst), seen);
    }

    #[test]
    fn reset_after_poll_clears_a_claimed_wake() {
        let w = Waker::new().expect("eventfd");
        w.reset_after_poll(false);
        assert!(!readable(&w));
        w.wake();
        // Not polled since, but the wake is claimed: it is consumed.
        w.reset_after_poll(false);
        assert!(!readable(&w));
        w.wake();
        w.wake();
        w.reset_after_poll(true);
        assert!(!readable(&w));
    }

    #[test]
    fn wake_from_another_thread() {
        let w = std::sync::Arc::new(Waker::new().expect("eventfd"));
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.wake());
        let mut fds = [PollFd::new(&*w, PollFlags::IN)];
        poll(&mut fds, None).expect("poll");
        t.join().expect("join");
        w.reset();
        assert!(!readable(&w));
    }
}
