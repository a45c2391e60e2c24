//! The compiled policies of recent generations, bounded by count and by age.
//!
//! An event is explained by the policy of the generation the kernel stamped on it, which can
//! be older than the one in force: a deny read from the ring buffer just after a flip, or an
//! aggregation summary written once its window is over. Each kept policy holds the whole
//! identity set and compile caches (at 20,000 pods several MiB each, see README "Kubernetes
//! scale"), so keeping a fixed number of them made the agent's memory grow with the rate of
//! change up to that number; a superseded policy is now dropped once it has been superseded
//! for longer than an event can take to be explained.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Generation (as the kernel stamps it: low 32 bits) -> value, newest last.
pub(super) struct Generations<T> {
    /// (generation, value, when a newer generation replaced it).
    entries: VecDeque<(u32, T, Option<Instant>)>,
    /// Never more than this many, whatever their age.
    keep: usize,
    /// A superseded generation is dropped this long after it was superseded.
    retain: Duration,
}

impl<T: Clone> Generations<T> {
    pub(super) fn new(keep: usize, retain: Duration) -> Self {
        Generations {
            entries: VecDeque::new(),
            keep: keep.max(1),
            retain,
        }
    }

    /// Makes `value` the newest generation at `now`, dropping what is past its retention.
    /// Republishing a generation (a change that failed before taking effect leaves its number
    /// to the next one) replaces its value.
    pub(super) fn publish(&mut self, generation: u32, value: T, now: Instant) {
        self.entries.retain(|(g, _, _)| *g != generation);
        if let Some((_, _, superseded)) = self.entries.back_mut() {
            superseded.get_or_insert(now);
        }
        self.entries.push_back((generation, value, None));
        let retain = self.retain;
        self.entries.retain(|(_, _, superseded)| {
            superseded.is_none_or(|at| now.saturating_duration_since(at) <= retain)
        });
        while self.entries.len() > self.keep {
            self.entries.pop_front();
        }
    }

    /// The value of `generation`, or the newest one for a generation no longer (or never)
    /// kept.
    pub(super) fn at(&self, generation: u32) -> Option<T> {
        let found = self.entries.iter().rev().find(|(g, _, _)| *g == generation);
        found
            .or(self.entries.back())
            .map(|(_, value, _)| value.clone())
    }

    /// The newest generation published.
    pub(super) fn newest(&self) -> Option<u32> {
        self.entries.back().map(|(generation, _, _)| *generation)
    }

    /// How many generations are kept.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(g: &Generations<&'static str>) -> Vec<u32> {
        g.entries
            .iter()
            .map(|(generation, _, _)| *generation)
            .collect()
    }

    #[test]
    fn superseded_generations_are_dropped_after_the_retention() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = Generations::new(32, s(10));
        g.publish(1, "one", t0);
        // Alone for longer than the retention: the newest is never dropped.
        g.publish(2, "two", t0 + s(30));
        assert_eq!(kept(&g), [1, 2], "1 was superseded just now");
        g.publish(3, "three", t0 + s(35));
        assert_eq!(kept(&g), [1, 2, 3], "1 superseded 5 s ago");
        g.publish(4, "four", t0 + s(41));
        assert_eq!(kept(&g), [2, 3, 4], "1 superseded 11 s ago, 2 6 s ago");
        assert_eq!(g.at(2), Some("two"));
        // A dropped generation is explained by the newest.
        assert_eq!(g.at(1), Some("four"));
        assert_eq!(g.newest(), Some(4));
    }

    #[test]
    fn never_more_than_keep() {
        let t0 = Instant::now();
        let mut g = Generations::new(4, Duration::from_secs(3600));
        for n in 0..10u32 {
            g.publish(n, "x", t0 + Duration::from_millis(n as u64));
        }
        assert_eq!(kept(&g), [6, 7, 8, 9]);
        assert_eq!(g.len(), 4);
    }

    #[test]
    fn a_republished_generation_replaces_its_value() {
        let t0 = Instant::now();
        let mut g = Generations::new(8, Duration::from_secs(10));
        g.publish(1, "one", t0);
        g.publish(2, "failed", t0);
        g.publish(2, "two", t0);
        assert_eq!(kept(&g), [1, 2]);
        assert_eq!(g.at(2), Some("two"));
        assert_eq!(g.at(7), Some("two"));
    }
}
