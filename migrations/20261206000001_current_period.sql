-- The current period's usage beside the running total (docs/architecture.md "Usage periods").
--
-- Before, every batch upserted two rows per consumer: its running total, and its total in the
-- batch's period in consumer_period_totals. That doubled the writes of the hot path (at 10M
-- consumers a batch took 56-61 s instead of 27-30 s, docs/benchmarks.md). Now a consumer's
-- row keeps the usage of its newest period too (period_start, period_total), updated by the
-- same upsert that adds to its total; the period moves to the period rows when a later period
-- replaces it. With many batches per period, a consumer's period row is written once per
-- period, not once per batch.
--
-- The upsert decides, under the row's lock, what moves: the row's old period when the batch
-- brings a newer one, or the batch's own amount when it is for an older one (a late file).
-- PostgreSQL 15 cannot return a row's old values from an upsert, so the upsert records what it
-- moved in moved_start / moved_total (NULL when nothing moved), returns them, and the same
-- transaction adds them to the period rows. Their values only mean something to the statement
-- that set them.
ALTER TABLE consumer_totals
    ADD COLUMN period_start TIMESTAMPTZ,
    ADD COLUMN period_total NUMERIC,
    ADD COLUMN moved_start  TIMESTAMPTZ,
    ADD COLUMN moved_total  NUMERIC;

-- The period rows keep their table (and its monthly partitions their names,
-- consumer_period_totals_YYYY_MM) under a new name; consumer_period_totals, what readers
-- query, becomes a view of the period rows and the current periods together. A (consumer,
-- period) can be in both (rows written before this migration): sum.
ALTER TABLE consumer_period_totals RENAME TO consumer_period_history;
ALTER INDEX consumer_period_totals_pkey RENAME TO consumer_period_history_pkey;

CREATE VIEW consumer_period_totals (consumer_id, period_start, total, updated_at) AS
    SELECT consumer_id, period_start, total, updated_at FROM consumer_period_history
    UNION ALL
    SELECT consumer_id, period_start, period_total, updated_at FROM consumer_totals
    WHERE period_start IS NOT NULL;

-- Rows inserted into the view (a correction, a fixture) become period rows; deleting from it
-- deletes period rows and clears current periods. (No ON CONFLICT, no UPDATE: write
-- consumer_period_history for those.) Either way usage_period_totals is not adjusted: a hand
-- correction must add to it in the same transaction (docs/operations.md).
CREATE FUNCTION tally_period_totals_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO consumer_period_history (consumer_id, period_start, total, updated_at)
        VALUES (NEW.consumer_id, NEW.period_start, NEW.total, coalesce(NEW.updated_at, now()));
        RETURN NEW;
    END IF;
    DELETE FROM consumer_period_history
    WHERE consumer_id = OLD.consumer_id AND period_start = OLD.period_start;
    UPDATE consumer_totals SET period_start = NULL, period_total = NULL
    WHERE consumer_id = OLD.consumer_id AND period_start = OLD.period_start;
    RETURN OLD;
END $$;

CREATE TRIGGER consumer_period_totals_write
    INSTEAD OF INSERT OR DELETE ON consumer_period_totals
    FOR EACH ROW EXECUTE FUNCTION tally_period_totals_write();

-- Partitions are made for the renamed table (same names, same check for a detached month).
CREATE OR REPLACE FUNCTION tally_ensure_period_partitions(times TIMESTAMPTZ[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    month TIMESTAMP;
    name  TEXT;
BEGIN
    FOR month IN
        SELECT DISTINCT date_trunc('month', t AT TIME ZONE 'UTC') + ahead * interval '1 month'
        FROM unnest(times) AS t, generate_series(0, 1) AS ahead
    LOOP
        name := 'consumer_period_totals_' || to_char(month, 'YYYY_MM');
        IF to_regclass(name) IS NOT NULL THEN
            CONTINUE WHEN EXISTS (SELECT 1 FROM pg_inherits
                                  WHERE inhrelid = to_regclass(name)
                                    AND inhparent = 'consumer_period_history'::regclass);
            -- A month detached to be archived: its rows are not in the table, and a new
            -- partition cannot take its name. Adding to it must wait for an operator.
            RAISE EXCEPTION 'table % exists but is no partition of consumer_period_history (detached?): attach it again, or rename or drop it, to take usage for that month', name;
        END IF;
        BEGIN
            EXECUTE format(
                'CREATE TABLE IF NOT EXISTS %I PARTITION OF consumer_period_history
                 FOR VALUES FROM (%L) TO (%L) WITH (fillfactor = 50)',
                name,
                (month AT TIME ZONE 'UTC')::text,
                ((month + interval '1 month') AT TIME ZONE 'UTC')::text);
        EXCEPTION WHEN duplicate_table OR unique_violation THEN
            NULL; -- created by another session meanwhile
        END;
    END LOOP;
END $$;

-- Moves the current periods that start before `before` off the consumers' rows to the period
-- rows (making their months' partitions if missing), in the caller's transaction; returns how
-- many moved. For `tally rollup`, and before a month is dropped or detached: its current
-- periods (consumers idle since) are then in its table (docs/operations.md, retention).
-- FOR UPDATE reads each row's latest version: a batch that committed meanwhile and brought a
-- newer period keeps it.
CREATE FUNCTION tally_settle_periods(before TIMESTAMPTZ) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    moved BIGINT;
BEGIN
    PERFORM tally_ensure_period_partitions(ARRAY(
        SELECT DISTINCT period_start FROM consumer_totals WHERE period_start < before));
    WITH cur AS (
        SELECT consumer_id, period_start, period_total FROM consumer_totals
        WHERE period_start < before ORDER BY consumer_id FOR UPDATE
    ), cleared AS (
        UPDATE consumer_totals t SET period_start = NULL, period_total = NULL
        FROM cur WHERE t.consumer_id = cur.consumer_id
    ), history AS (
        INSERT INTO consumer_period_history (consumer_id, period_start, total)
        SELECT consumer_id, period_start, period_total FROM cur ORDER BY 1, 2
        ON CONFLICT (consumer_id, period_start) DO UPDATE
          SET total = consumer_period_history.total + EXCLUDED.total, updated_at = now()
    )
    SELECT count(*) INTO moved FROM cur;
    RETURN moved;
END $$;
