-- Usage per period, beside the running totals (docs/architecture.md "Usage periods").
-- A line counts in the period of its file's time (`--period`, epoch-aligned in UTC). Updated
-- in the same transaction as consumer_totals and the offsets, so for every consumer the sum
-- over its periods equals its running total (for what was ingested with periods on).
-- Range-partitioned by month: old months are dropped whole (the retention knob,
-- docs/operations.md), and `tally rollup` folds old fine periods into coarse ones.
CREATE TABLE consumer_period_totals (
    consumer_id  BIGINT      NOT NULL,
    period_start TIMESTAMPTZ NOT NULL,
    total        NUMERIC     NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_id, period_start)
) PARTITION BY RANGE (period_start);

-- Creates the monthly partitions (UTC months) holding `times` and the month after each, if
-- missing: called by the db-client (outside its batch transaction) before it writes periods.
-- Safe to call from several sessions at once.
CREATE FUNCTION tally_ensure_period_partitions(times TIMESTAMPTZ[]) RETURNS void
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
                                    AND inhparent = 'consumer_period_totals'::regclass);
            -- A month detached to be archived: its rows are not in the table, and a new
            -- partition cannot take its name. Adding to it must wait for an operator.
            RAISE EXCEPTION 'table % exists but is no partition of consumer_period_totals (detached?): attach it again, or rename or drop it, to take usage for that month', name;
        END IF;
        BEGIN
            EXECUTE format(
                'CREATE TABLE IF NOT EXISTS %I PARTITION OF consumer_period_totals
                 FOR VALUES FROM (%L) TO (%L) WITH (fillfactor = 50)',
                name,
                (month AT TIME ZONE 'UTC')::text,
                ((month + interval '1 month') AT TIME ZONE 'UTC')::text);
        EXCEPTION WHEN duplicate_table OR unique_violation THEN
            NULL; -- created by another session meanwhile
        END;
    END LOOP;
END $$;
