//! The live tail of each watched conversation, shared by all of its event-stream subscribers.
//!
//! After each apply COMMIT the state machine hands the newly stored records to [`Tail::publish`].
//! For every conversation that has at least one subscriber, the records are serialised ONCE into
//! their SSE event bytes and appended to that conversation's window (the most recent events, at
//! most [`WINDOW_EVENTS`] and a share of [`TOTAL_WINDOW_BYTES`]); only that conversation's
//! subscribers are woken, and each sends the shared bytes on. Conversations nobody follows cost
//! nothing here.
//!
//! Subscribers keep no queue: one that is behind the window (history, catch-up, a slow reader)
//! reads pages from SQLite, and one whose next seq is in the window takes it from memory. Seq is
//! dense per conversation and a subscriber always asks for exactly its next seq, so the switch
//! between the two has no gap and no duplicate (see [`Subscription::next`]).
//!
//! Invariants, kept under each window's lock:
//! - The window holds consecutive seqs. It is filled only by publishes, which run in apply order
//!   after each COMMIT; so a window that is not empty ends at the conversation's last applied
//!   seq. An empty window (new subscription, node restart, snapshot install) knows nothing, and
//!   its subscribers go to SQLite.
//! - Every change bumps `version`. A subscriber that found nothing in SQLite waits only if the
//!   version is still the one it saw before the read; a publish in between makes it look again,
//!   so no wake-up is lost between the read and the wait.

pub mod event;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Waker;

use bytes::{Bytes, BytesMut};

use crate::types::Record;

/// The most events a conversation's window keeps.
pub const WINDOW_EVENTS: usize = 4096;
/// The event bytes all windows together may keep; each window gets an equal share of it,
/// between [`MIN_WINDOW_BYTES`] and [`MAX_WINDOW_BYTES`].
pub const TOTAL_WINDOW_BYTES: usize = 256 << 20;
const MIN_WINDOW_BYTES: usize = 64 << 10;
const MAX_WINDOW_BYTES: usize = 4 << 20;

/// The live tails of one node. Cloning shares them.
#[derive(Clone, Default)]
pub struct Tail {
    shared: Arc<TailShared>,
}

#[derive(Default)]
struct TailShared {
    /// The windows of the conversations that have subscribers. A window lives as long as one
    /// of its subscriptions; an entry whose window is gone is removed when next seen.
    convs: Mutex<HashMap<String, Weak<ConvTail>>>,
    /// Set once the node stops: every subscription ends.
    closed: AtomicBool,
}

struct ConvTail {
    /// The key of this window in `TailShared::convs`.
    conv_id: String,
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    /// Seq of `events[0]`.
    first_seq: u64,
    /// Consecutive events from `first_seq` on, each the complete bytes of one SSE event.
    events: VecDeque<Bytes>,
    /// Sum of the lengths of `events`.
    bytes: usize,
    /// Bumped by every publish, reset and close.
    version: u64,
    /// One slot per subscription: the waker of a subscription waiting for this window.
    waiters: Vec<Option<Waker>>,
    /// Slots of ended subscriptions, for reuse.
    free: Vec<usize>,
    /// The node is stopping.
    closed: bool,
}

/// What a subscription should do next, from [`Subscription::next`].
#[derive(Debug)]
pub enum Next {
    /// The events from the asked seq on (one or more, as one chunk) and the seq after them.
    Events(Bytes, u64),
    /// The asked seq is not in memory: read it from the store. Hand the `version` to the next
    /// call together with whether the read found anything.
    Behind(u64),
    /// Nothing to send yet: the waker is registered and is woken by the next change.
    Wait,
    /// The node is stopping: end the stream.
    Closed,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks stays consistent even if a holder panicked (each change is
    // a few plain assignments), so a poisoned lock is used as it is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tail {
    pub fn new() -> Tail {
        Tail::default()
    }

    /// Starts following `conv_id`: its window is created when it has no subscriber yet.
    pub fn subscribe(&self, conv_id: &str) -> Subscription {
        let conv = {
            let mut convs = lock(&self.shared.convs);
            match convs.get(conv_id).and_then(Weak::upgrade) {
                Some(c) => c,
                None => {
                    let c = Arc::new(ConvTail {
                        conv_id: conv_id.to_owned(),
                        window: Mutex::new(Window::default()),
                    });
                    convs.insert(conv_id.to_owned(), Arc::downgrade(&c));
                    c
                }
            }
        };
        let slot = {
            let mut w = lock(&conv.window);
            // A subscription made while `close` runs sees the flag here or is closed by it.
            w.closed |= self.shared.closed.load(Ordering::Acquire);
            match w.free.pop() {
                Some(i) => i,
                None => {
                    w.waiters.push(None);
                    w.waiters.len() - 1
                }
            }
        };
        Subscription {
            tail: self.clone(),
            conv,
            slot,
        }
    }

    /// Hands the records an apply just committed to their conversations' windows and wakes
    /// their subscribers. Called by the state machine, in apply order, after each COMMIT.
    pub fn publish<'a>(&self, records: impl IntoIterator<Item = &'a Record>) {
        let (groups, share) = {
            let mut convs = lock(&self.shared.convs);
            if convs.is_empty() {
                return;
            }
            let mut groups: Vec<(Arc<ConvTail>, Vec<&Record>)> = Vec::new();
            for r in records {
                if let Some((_, rs)) = groups.iter_mut().find(|(_, rs)| rs[0].conv_id == r.conv_id)
                {
                    rs.push(r);
                    continue;
                }
                match convs.get(&r.conv_id).map(Weak::upgrade) {
                    Some(Some(c)) => groups.push((c, vec![r])),
                    Some(None) => {
                        convs.remove(&r.conv_id);
                    }
                    None => {}
                }
            }
            let share =
                (TOTAL_WINDOW_BYTES / convs.len().max(1)).clamp(MIN_WINDOW_BYTES, MAX_WINDOW_BYTES);
            (groups, share)
        };
        for (conv, records) in groups {
            // One buffer for the conversation's part of the batch; each event is a slice of it.
            let mut buf = Vec::with_capacity(records.len() * 512);
            let mut ends = Vec::with_capacity(records.len());
            for r in &records {
                event::write_record(&mut buf, r);
                ends.push(buf.len());
            }
            let buf = Bytes::from(buf);
            let wakers = {
                let mut w = lock(&conv.window);
                let mut start = 0;
                for (r, end) in records.iter().zip(ends) {
                    w.push(r.seq, buf.slice(start..end), share);
                    start = end;
                }
                w.version += 1;
                w.take_wakers()
            };
            wakers.into_iter().for_each(Waker::wake);
        }
    }

    /// Forgets every window, after the whole state was replaced (snapshot install): its
    /// subscribers read the new state from the store until publishes fill the windows again.
    pub fn reset(&self) {
        self.for_each_window(|w| {
            w.events.clear();
            w.bytes = 0;
        });
    }

    /// Ends every subscription, now and to come: the node is stopping.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.for_each_window(|w| w.closed = true);
    }

    fn for_each_window(&self, f: impl Fn(&mut Window)) {
        let live: Vec<Arc<ConvTail>> = lock(&self.shared.convs)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for conv in live {
            let wakers = {
                let mut w = lock(&conv.window);
                f(&mut w);
                w.version += 1;
                w.take_wakers()
            };
            wakers.into_iter().for_each(Waker::wake);
        }
    }

    /// Conversations with a window, and the event bytes the windows hold (for tests).
    pub fn usage(&self) -> (usize, usize) {
        let live: Vec<Arc<ConvTail>> = lock(&self.shared.convs)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        let bytes = live.iter().map(|c| lock(&c.window).bytes).sum();
        (live.len(), bytes)
    }
}

impl Window {
    /// Appends the event of `seq`, then drops the oldest events beyond the limits (never the
    /// newest: a window that is not empty must end at the last applied seq).
    fn push(&mut self, seq: u64, event: Bytes, max_bytes: usize) {
        if self.events.is_empty() || seq != self.first_seq + self.events.len() as u64 {
            // Not the next seq: only after the state changed under the window, which
            // `reset` already handles. Start over rather than leave a gap inside the window.
            self.events.clear();
            self.bytes = 0;
            self.first_seq = seq;
        }
        self.bytes += event.len();
        self.events.push_back(event);
        while self.events.len() > 1 && (self.events.len() > WINDOW_EVENTS || self.bytes > max_bytes)
        {
            if let Some(old) = self.events.pop_front() {
                self.bytes -= old.len();
                self.first_seq += 1;
            }
        }
    }

    fn take_wakers(&mut self) -> Vec<Waker> {
        self.waiters.iter_mut().filter_map(Option::take).collect()
    }
}

/// One subscriber's hold on its conversation's window.
pub struct Subscription {
    tail: Tail,
    conv: Arc<ConvTail>,
    /// This subscription's place in the window's `waiters`.
    slot: usize,
}

impl Subscription {
    /// What to do to send `seq` and the events after it.
    ///
    /// `read_empty_at` is the version of the last [`Next::Behind`] whose store read found
    /// nothing from `seq` on; while the window is still at that version, the subscriber is
    /// caught up and waits. At most about `max_bytes` of events come in one chunk.
    pub fn next(
        &self,
        seq: u64,
        read_empty_at: Option<u64>,
        max_bytes: usize,
        waker: &Waker,
    ) -> Next {
        let mut w = lock(&self.conv.window);
        if w.closed {
            return Next::Closed;
        }
        if w.events.is_empty() {
            if read_empty_at != Some(w.version) {
                return Next::Behind(w.version);
            }
        } else {
            if seq < w.first_seq {
                return Next::Behind(w.version);
            }
            let from = (seq - w.first_seq) as usize;
            if from < w.events.len() {
                let (chunk, n) = w.chunk(from, max_bytes);
                return Next::Events(chunk, seq + n as u64);
            }
        }
        // Caught up (or waiting for a seq beyond the last one): wait for the next change.
        match &mut w.waiters[self.slot] {
            Some(old) if old.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
        Next::Wait
    }
}

impl Window {
    /// The events from index `from` on as one chunk of at most `max_bytes` (but at least one
    /// event), and how many events it holds. A single event is shared, not copied.
    fn chunk(&self, from: usize, max_bytes: usize) -> (Bytes, usize) {
        let mut n = 0;
        let mut len = 0;
        for e in self.events.range(from..) {
            if n > 0 && len + e.len() > max_bytes {
                break;
            }
            len += e.len();
            n += 1;
        }
        if n == 1 {
            return (self.events[from].clone(), 1);
        }
        let mut out = BytesMut::with_capacity(len);
        for e in self.events.range(from..from + n) {
            out.extend_from_slice(e);
        }
        (out.freeze(), n)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        {
            let mut w = lock(&self.conv.window);
            w.waiters[self.slot] = None;
            w.free.push(self.slot);
        }
        let mut convs = lock(&self.tail.shared.convs);
        // New holders take the map lock first, so nobody else can be about to use this
        // window when this is its last holder.
        let mine = |c: &Weak<ConvTail>| std::ptr::eq(c.as_ptr(), Arc::as_ptr(&self.conv));
        if Arc::strong_count(&self.conv) == 1 && convs.get(&self.conv.conv_id).is_some_and(mine) {
            convs.remove(&self.conv.conv_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;
    use uuid::Uuid;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count::default());
        (c.clone(), Waker::from(c))
    }
    fn woken(c: &Count) -> usize {
        c.0.load(Ordering::SeqCst)
    }

    fn rec(conv: &str, seq: u64) -> Record {
        Record {
            index: seq * 10,
            seq,
            term: 1,
            conv_id: conv.into(),
            msg_id: Uuid::new_v4(),
            sender: "s".into(),
            payload: format!("p{seq}"),
            vector_clock: None,
            committed_at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    fn wire(records: &[Record]) -> Bytes {
        let mut out = Vec::new();
        for r in records {
            event::write_record(&mut out, r);
        }
        Bytes::from(out)
    }

    #[test]
    fn an_empty_window_sends_to_the_store_until_a_read_found_nothing() {
        let tail = Tail::new();
        let sub = tail.subscribe("a");
        let (count, waker) = counter();
        let Next::Behind(v) = sub.next(1, None, 1 << 20, &waker) else {
            panic!("an empty window must send the subscriber to the store");
        };
        // The read found nothing, but a publish came in between: look again, don't wait.
        let r1 = rec("a", 1);
        tail.publish([&r1]);
        match sub.next(1, Some(v), 1 << 20, &waker) {
            Next::Events(b, next) => {
                assert_eq!(b, wire(&[r1]));
                assert_eq!(next, 2);
            }
            other => panic!("{other:?}"),
        }
        // Caught up: wait, and the next publish wakes it once.
        assert!(matches!(sub.next(2, Some(v), 1 << 20, &waker), Next::Wait));
        assert_eq!(woken(&count), 0);
        let r2 = rec("a", 2);
        tail.publish([&r2]);
        assert_eq!(woken(&count), 1);
        // A read that found nothing at the current version means: wait.
        tail.reset();
        assert_eq!(woken(&count), 1, "not registered any more");
        let Next::Behind(v) = sub.next(3, None, 1 << 20, &waker) else {
            panic!("after a reset the window knows nothing");
        };
        assert!(matches!(sub.next(3, Some(v), 1 << 20, &waker), Next::Wait));
        tail.close();
        assert_eq!(woken(&count), 2);
        assert!(matches!(sub.next(3, None, 1 << 20, &waker), Next::Closed));
        assert!(matches!(
            tail.subscribe("b").next(1, None, 1 << 20, &waker),
            Next::Closed
        ));
    }

    #[test]
    fn store_then_window_joins_without_gap_or_duplicate() {
        // Seqs 1..=10 are only in the store; the window starts at 11.
        let tail = Tail::new();
        let sub = tail.subscribe("a");
        let (_, waker) = counter();
        let records: Vec<Record> = (1..=30).map(|s| rec("a", s)).collect();
        tail.publish(&records[10..20]);
        assert!(matches!(
            sub.next(3, None, 1 << 20, &waker),
            Next::Behind(_)
        ));
        // After reading 3..=10 from the store, the subscriber asks for 11: all of the window.
        match sub.next(11, None, 1 << 20, &waker) {
            Next::Events(b, next) => {
                assert_eq!(b, wire(&records[10..20]));
                assert_eq!(next, 21);
            }
            other => panic!("{other:?}"),
        }
        // A store read may run ahead of the window (committed, not yet published): the
        // subscriber waits for the window to reach its seq, then gets exactly that on.
        assert!(matches!(sub.next(24, None, 1 << 20, &waker), Next::Wait));
        tail.publish(&records[20..30]);
        match sub.next(24, None, 1 << 20, &waker) {
            Next::Events(b, next) => {
                assert_eq!(b, wire(&records[23..30]));
                assert_eq!(next, 31);
            }
            other => panic!("{other:?}"),
        }
        // Chunks are bounded by bytes but hold at least one event.
        let one = wire(&records[20..21]).len();
        match sub.next(21, None, one * 2 + 1, &waker) {
            Next::Events(b, next) => {
                assert_eq!(b, wire(&records[20..22]));
                assert_eq!(next, 23);
            }
            other => panic!("{other:?}"),
        }
        match sub.next(21, None, 1, &waker) {
            Next::Events(b, next) => {
                assert_eq!(b, wire(&records[20..21]));
                assert_eq!(next, 22);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_window_keeps_the_newest_events_and_sends_older_seqs_to_the_store() {
        let tail = Tail::new();
        let sub = tail.subscribe("a");
        let (_, waker) = counter();
        let total = WINDOW_EVENTS as u64 + 100;
        let records: Vec<Record> = (1..=total).map(|s| rec("a", s)).collect();
        for chunk in records.chunks(300) {
            tail.publish(chunk);
        }
        assert!(matches!(
            sub.next(100, None, 1 << 30, &waker),
            Next::Behind(_)
        ));
        match sub.next(101, None, 1 << 30, &waker) {
            Next::Events(b, next) => {
                assert_eq!(b, wire(&records[100..]));
                assert_eq!(next, total + 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_watched_conversations_keep_a_window_and_wake_subscribers() {
        let tail = Tail::new();
        let a = tail.subscribe("a");
        let b = tail.subscribe("b");
        let (ca, wa) = counter();
        let (cb, wb) = counter();
        let Next::Behind(va) = a.next(1, None, 1 << 20, &wa) else {
            panic!()
        };
        let Next::Behind(vb) = b.next(1, None, 1 << 20, &wb) else {
            panic!()
        };
        assert!(matches!(a.next(1, Some(va), 1 << 20, &wa), Next::Wait));
        assert!(matches!(b.next(1, Some(vb), 1 << 20, &wb), Next::Wait));
        tail.publish(&[rec("a", 1), rec("c", 1), rec("a", 2)]);
        assert_eq!((woken(&ca), woken(&cb)), (1, 0));
        let (convs, bytes) = tail.usage();
        assert_eq!(convs, 2);
        assert_eq!(bytes, wire(&[rec("a", 1), rec("a", 2)]).len());
        drop(a);
        assert_eq!(
            tail.usage(),
            (1, 0),
            "the last subscriber took its window along"
        );
        drop(b);
        assert_eq!(tail.usage(), (0, 0));
        assert!(lock(&tail.shared.convs).is_empty());
    }
}
