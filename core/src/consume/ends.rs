//! Where a partition held stands against its end, from what the client already knows (no
//! request): the end told (`PartitionEOF`), the high watermark of the last fetch, and the
//! position. A batch ends by these ([`super::BatchLimits`]).

use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedMessage;
use rdkafka::Offset;

use super::Group;

impl Group {
    /// Whether `batch` has records and a partition held still has records on their way to
    /// it: polled and kept, or no end told since its last record ([`super::BatchLimits::read_through`]).
    pub(super) fn reading(&self, batch: &[OwnedMessage]) -> bool {
        !batch.is_empty()
            && (!self.intake.is_empty() || self.assigned.iter().any(|p| !self.at_end.contains(p)))
    }

    /// Whether `partition`, whose last record read is at `offset`, has nothing past it but
    /// that record's transaction marker, by the high watermark of the client's last fetch.
    pub(super) fn read_to_watermark(&self, partition: i32, offset: i64) -> bool {
        self.high_watermark(partition)
            .is_some_and(|high| high <= offset + 2)
    }

    /// `partition`'s high watermark as the client's last fetch told it (no request).
    pub(super) fn high_watermark(&self, partition: i32) -> Option<i64> {
        crate::kafka::cached_watermarks(self.consumer.client(), &self.topic, partition)
            .map(|(_, high)| high)
    }

    /// Whether every partition held is read up to the high watermark of the client's last
    /// fetch: past its last record at most that record's transaction marker, or, with its
    /// end told since, nothing past its position (a writer that wrote since, committed or
    /// not, has moved the watermark). None loading, nothing stashed
    /// ([`super::BatchLimits::end_at_watermark`]).
    pub(super) fn caught_up(&self) -> bool {
        if !(self.loading.is_empty() && self.intake.is_empty()) {
            return false;
        }
        let Ok(positions) = self.consumer.position() else {
            return false;
        };
        let position = |p: i32| {
            positions.elements().iter().find_map(|e| match e.offset() {
                Offset::Offset(at) if e.partition() == p => Some(at),
                _ => None,
            })
        };
        self.assigned.iter().all(|&p| match self.last_read.get(&p) {
            Some(&last) => self.read_to_watermark(p, last),
            None => {
                self.at_end.contains(&p)
                    && position(p)
                        .zip(self.high_watermark(p))
                        .is_some_and(|(at, high)| high <= at)
            }
        })
    }

    /// Whether every partition held is at its end, none loading, nothing stashed.
    pub(super) fn drained(&self) -> bool {
        self.loading.is_empty()
            && self.intake.is_empty()
            && self.assigned.iter().all(|p| self.at_end.contains(p))
    }

    /// Whether a partition held has records past this member's position that are not
    /// readable yet: a writer's open transaction (read_committed stops at the last stable
    /// offset, the high watermark is past it). Its records arrive when it commits, typically
    /// soon (a parser's next sums while this aggregator merges its last); waiting for them, at
    /// most the batch's `max_wait`, writes their consumers once instead of twice. Both figures
    /// are the client's own, from its last fetch: no request. A partition this member has
    /// read nothing from since it was assigned has no known position and counts as not open.
    /// Right after a record (no end told since), one offset past the position is that
    /// record's transaction marker, not an open transaction.
    pub(super) fn open_upstream(&self) -> bool {
        let Ok(positions) = self.consumer.position() else {
            return false;
        };
        positions.elements().iter().any(|e| {
            let Offset::Offset(at) = e.offset() else {
                return false;
            };
            let marker = i64::from(self.last_read.get(&e.partition()) == Some(&(at - 1)));
            self.assigned.contains(&e.partition())
                && self
                    .high_watermark(e.partition())
                    .is_some_and(|high| high > at + marker)
        })
    }
}
