//! Workers' maps kept from one range to the next ([`crate::sum_range_held`]), and the drain
//! that sends a map's sums to the sink in bounded batches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tally_model::sums::agg;

use crate::{Sink, Stopped};

/// Workers' maps kept between calls of [`crate::sum_range_held`]. At most one per thread of the
/// pool that fills it, each capped at its thread's share of `keys_max`, so all it holds stays
/// within the budget.
#[derive(Default)]
pub struct Held {
    maps: Mutex<Vec<agg::Aggregator>>,
}

impl Held {
    /// Nothing held.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when no sums are held.
    pub fn is_empty(&self) -> bool {
        self.lock().iter().all(agg::Aggregator::is_empty)
    }

    /// Sends every sum held to `sink`, each map drained on a thread of `pool`, in batches of
    /// at most 65,536 sums. The maps stay (empty) for the next range. On
    /// [`Stopped`], what was not sent is dropped.
    pub fn flush(&self, pool: &rayon::ThreadPool, sink: &dyn Sink) -> Result<(), Stopped> {
        let mut guard = self.lock();
        let maps: &mut [agg::Aggregator] = &mut guard;
        let stopped = AtomicBool::new(false);
        pool.scope(|scope| {
            for map in maps.iter_mut() {
                let stopped = &stopped;
                scope.spawn(move |_| {
                    if drain(map, EMIT_MAX, sink).is_err() {
                        stopped.store(true, Ordering::Relaxed);
                    }
                });
            }
        });
        if stopped.into_inner() {
            guard.clear();
            return Err(Stopped);
        }
        Ok(())
    }

    /// Drops every sum held.
    pub fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn take(&self) -> Option<agg::Aggregator> {
        self.lock().pop()
    }

    pub(crate) fn put(&self, map: agg::Aggregator) {
        self.lock().push(map);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<agg::Aggregator>> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Most sums a worker hands the sink in one batch.
pub(crate) const EMIT_MAX: usize = 1 << 16;

/// Moves everything `map` holds to `sink`, in batches of about `emit_at` sums.
pub(crate) fn drain(
    map: &mut agg::Aggregator,
    emit_at: usize,
    sink: &dyn Sink,
) -> Result<u64, Stopped> {
    let mut batches = 0;
    let mut out = Vec::new();
    if !map.is_empty() {
        for piece in 0..map.pieces() {
            map.drain_piece(piece, &mut out);
            if out.len() >= emit_at {
                batches += 1;
                sink.sums(std::mem::take(&mut out))?;
            }
        }
    }
    if !out.is_empty() {
        batches += 1;
        sink.sums(out)?;
    }
    Ok(batches)
}
