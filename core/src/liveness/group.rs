//! The group's side of a stall: a stage that holds no partition may still be the one that
//! should. Asked of the broker (the group's members and their assignments, the group's
//! committed offsets, the partitions' ends): which partitions of the input have records
//! waiting while no other member holds them. Some, for longer than the limit while the broker
//! answers, is a stall of this member (a consumer left hanging in a rebalance, e.g.
//! librdkafka's `wait-unassign-to-complete` after a broker restart); none is a surplus member
//! in a healthy group, or an idle one: not a stall.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::args::KafkaArgs;
use crate::kafka::BrokerProbe;

/// Who this member is in its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Member {
    /// The consumer group.
    pub group: String,
    /// The input topic.
    pub topic: String,
    /// The consumer's `client.id`, as the broker lists it for its member.
    pub client_id: String,
}

/// The partitions of `topic` in a member's assignment (Kafka's ConsumerProtocol assignment:
/// version i16, then topics as i16-length name and an i32 count of i32 partitions, then user
/// data); `None` if the bytes are not one.
pub(super) fn assigned_partitions(bytes: &[u8], topic: &str) -> Option<Vec<i32>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let slice = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(slice)
    };
    let _version = i16::from_be_bytes(take(2)?.try_into().ok()?);
    let topics = i32::from_be_bytes(take(4)?.try_into().ok()?);
    let mut found = Vec::new();
    for _ in 0..topics.max(0) {
        let len = i16::from_be_bytes(take(2)?.try_into().ok()?);
        let name = take(usize::try_from(len).ok()?)?.to_vec();
        let count = i32::from_be_bytes(take(4)?.try_into().ok()?);
        for _ in 0..count.max(0) {
            let p = i32::from_be_bytes(take(4)?.try_into().ok()?);
            if name == topic.as_bytes() {
                found.push(p);
            }
        }
    }
    Some(found)
}

/// The state of the group as the broker tells it.
struct View {
    state: String,
    /// Partitions held by members other than this one.
    held_by_others: BTreeSet<i32>,
}

fn view(probe: &BrokerProbe, member: &Member) -> Result<Option<View>, KafkaError> {
    let list = probe.group_list(&member.group)?;
    let Some(group) = list.groups().iter().find(|g| g.name() == member.group) else {
        return Ok(None);
    };
    let ours = group
        .members()
        .iter()
        .filter(|m| m.client_id() == member.client_id)
        .count();
    let mut held_by_others = BTreeSet::new();
    for m in group.members() {
        // With a client id shared by several members (set by hand), none is known as ours:
        // every held partition counts as held.
        if ours == 1 && m.client_id() == member.client_id {
            continue;
        }
        let parts = m
            .assignment()
            .and_then(|bytes| assigned_partitions(bytes, &member.topic))
            .unwrap_or_default();
        held_by_others.extend(parts);
    }
    Ok(Some(View {
        state: group.state().to_owned(),
        held_by_others,
    }))
}

/// Records waiting in partitions of the input that no other member holds, while this member
/// holds none: `Ok(None)` when there are none (or the group is rebalancing, which is judged
/// once it ends), else why this member is stalled. `offsets` is a client of the group's id
/// for its committed offsets (never joining), created on first use.
pub(super) fn unheld_work(
    probe: &BrokerProbe,
    kafka: &KafkaArgs,
    offsets: &mut Option<BaseConsumer>,
    member: &Member,
) -> anyhow::Result<Option<String>> {
    let Some(view) = view(probe, member)? else {
        return Ok(None);
    };
    if !matches!(view.state.as_str(), "Stable" | "Empty" | "Dead") {
        return Ok(None);
    }
    let partitions = probe.partition_count(&member.topic)?;
    let loose: Vec<i32> = (0..partitions)
        .filter(|p| !view.held_by_others.contains(p))
        .collect();
    if loose.is_empty() {
        return Ok(None);
    }
    if offsets.is_none() {
        *offsets = Some(crate::kafka::reader(
            kafka,
            &member.group,
            crate::kafka::Ends::Silent,
        )?);
    }
    let reader = offsets.as_ref().ok_or(KafkaError::Canceled)?;
    let mut tpl = TopicPartitionList::new();
    for p in &loose {
        tpl.add_partition(&member.topic, *p);
    }
    let committed = reader.committed_offsets(tpl, Duration::from_secs(10));
    let committed = match committed {
        Ok(c) => c,
        Err(error) => {
            // Its client may be stale after a broker restart: a fresh one next time.
            *offsets = None;
            return Err(error.into());
        }
    };
    // Records past the committed offsets, read (read_committed) to tell them from a
    // transaction's end marker.
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in loose {
        let (low, high) = probe.watermarks(&member.topic, p)?;
        let from = committed
            .find_partition(&member.topic, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(low)
            .max(low);
        if high > from {
            tpl.add_partition_offset(&member.topic, p, Offset::Offset(from))?;
            ends.push((p, from, high));
        }
    }
    if ends.is_empty() {
        return Ok(None);
    }
    let with_work = records_in(reader, &member.topic, &tpl, &ends)?;
    Ok((!with_work.is_empty()).then(|| {
        let waiting: i64 = ends
            .iter()
            .filter(|(p, ..)| with_work.contains(p))
            .map(|(_, from, high)| high - from)
            .sum();
        format!(
            "records wait (up to {waiting}) in partitions {with_work:?} of {} that no member of \
             {} holds (group {}), and this member holds none",
            member.topic, member.group, view.state
        )
    }))
}

/// The partitions of `tpl` (assigned at their committed offsets) in which a record can be
/// read before `ends` (partition, from, high watermark).
fn records_in(
    reader: &BaseConsumer,
    topic: &str,
    tpl: &TopicPartitionList,
    ends: &[(i32, i64, i64)],
) -> anyhow::Result<BTreeSet<i32>> {
    use rdkafka::Message;
    reader.assign(tpl)?;
    let mut found = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline && found.len() < ends.len() {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                found.insert(message.partition());
            }
            Some(Err(error)) => {
                let _ = reader.unassign();
                return Err(error.into());
            }
            None => {
                let at_end = ends.iter().all(|&(p, _, high)| {
                    found.contains(&p)
                        || crate::kafka::position_of(reader, topic, p).is_ok_and(|pos| pos >= high)
                });
                if at_end {
                    break;
                }
            }
        }
    }
    let _ = reader.unassign();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(topics: &[(&str, &[i32])]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(1i16.to_be_bytes());
        b.extend((topics.len() as i32).to_be_bytes());
        for (name, parts) in topics {
            b.extend((name.len() as i16).to_be_bytes());
            b.extend(name.as_bytes());
            b.extend((parts.len() as i32).to_be_bytes());
            for p in *parts {
                b.extend(p.to_be_bytes());
            }
        }
        b.extend((-1i32).to_be_bytes());
        b
    }

    #[test]
    fn decodes_the_partitions_of_one_topic() {
        let bytes = assignment(&[("a.sums", &[0, 3]), ("a.files", &[1, 2, 5])]);
        assert_eq!(assigned_partitions(&bytes, "a.files"), Some(vec![1, 2, 5]));
        assert_eq!(assigned_partitions(&bytes, "a.sums"), Some(vec![0, 3]));
        assert_eq!(assigned_partitions(&bytes, "b"), Some(vec![]));
        assert_eq!(
            assigned_partitions(&assignment(&[]), "a.files"),
            Some(vec![])
        );
        // Cut anywhere: not an assignment, never a panic.
        for cut in 0..bytes.len() - 4 {
            let _ = assigned_partitions(&bytes[..cut], "a.files");
        }
        assert_eq!(assigned_partitions(&bytes[..9], "a.files"), None);
    }
}
