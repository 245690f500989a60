-- Readers of the change log wait for its writers only (docs/architecture.md "Change log").
--
-- A reader may read the events of a transaction id only once no transaction with a lower id
-- can still commit events. Before, it waited for every transaction of the server that had an
-- id (pg_snapshot_xmin): a session left idle in a transaction that had written anything,
-- in any database of the cluster, held every reader back for as long as it stayed open.
--
-- Now every writer of the log holds a shared advisory lock from its transaction's start,
-- before its first write takes an id (tally_change_log_writing), and readers wait only for the
-- lock's holders (tally_change_log_horizon).
--
-- Why no writer is skipped: the horizon is the least of the snapshot's xmax and the ids of
-- the lock's holders, the snapshot taken before pg_locks is read. A writer still running when
-- the reader's next statement reads events has an id either below that xmax (then it took it
-- before the snapshot, after the lock, so it held the lock when pg_locks was read and the
-- horizon is at most its id) or not (then the horizon is at most its id too). So the reader
-- must read the events in a later statement than the one that computed the horizon.

-- Called by a writer of the change log as its transaction's first statement (before any write).
CREATE FUNCTION tally_change_log_writing() RETURNS void
LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock_shared(8386103194289399927) -- "tallychw"
$$;

-- The transaction id below which every change log event is final: no transaction with a
-- lower id can still commit one.
CREATE FUNCTION tally_change_log_horizon() RETURNS xid8
LANGUAGE sql VOLATILE AS $$
    WITH snap AS (
        SELECT pg_snapshot_xmax(pg_current_snapshot())::text::numeric AS next
    ), writers AS (
        -- A running transaction's 32-bit id, widened by its distance to the snapshot's
        -- xmax (less than 2^31 either way).
        SELECT snap.next + mod(a.backend_xid::text::numeric - mod(snap.next, 4294967296)
                               + 6442450944, 4294967296) - 2147483648 AS id
        FROM snap, pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid::bigint = 8386103194289399927 >> 32
          AND l.objid::bigint = 8386103194289399927 & 4294967295
          AND l.objsubid = 1
          AND a.backend_xid IS NOT NULL
    )
    SELECT least((SELECT next FROM snap), (SELECT min(id) FROM writers))::text::xid8
$$;
