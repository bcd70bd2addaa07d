-- Danbyte Webhooks, migration 007: one captured row per statement.
-- Apply after 006_quick_turn.sql, the same way (psql or `danbyte-webhooks migrate`).
--
-- The capture triggers no longer write one outbox row per changed row: they
-- write one row per statement into webhooks.capture, holding the statement's
-- rows as a JSON array (two arrays for an UPDATE, old and new rows in the
-- same order). The dispatcher's turn unpacks them: each change some webhook
-- wants becomes an outbox row, as before, already dispatched, and everything
-- downstream (deliveries, the delivery log, retention) is unchanged.
--
-- What it saves the application, in server instructions per row (valgrind,
-- `python -m tests.bench.instructions`): a 100-row INSERT added 33,800 and
-- now adds about 11,000; a 100-row UPDATE 48,500, now about 21,000. Per row
-- there is no heap tuple and no index entry left, only the row's JSON. A
-- single-row statement writes one row and one index entry instead of one row
-- and two.
--
-- The sharp edges:
--  * A JSON value cannot exceed 1 GB. A statement that changed more than
--    1,000 rows is captured in rows of 1,000 changes (the trigger's first
--    query reads at most 1,001 rows: it tells, for the cost of a LIMIT).
--  * The fan-out takes a big statement's changes over as many turns as its
--    room needs (capture.fanned counts those taken), first to last.
--  * An UPDATE that changes nothing is now dropped by the dispatcher, not by
--    the trigger: pairing old and new rows in the trigger cost more than
--    the rest of the capture. The dispatcher's fan-out skips them as before.
--  * A change's id is now derived from its statement's capture id and its
--    place in the statement (webhooks.change_id): a turn that is lost and
--    redone makes the same outbox ids, so the same delivery ids (see 006).
--    Capture ids start high enough that change ids stay above every outbox
--    id made before.
--  * Changes still waiting in the outbox when this migration runs, and any
--    that a write already inside the old capture function commits after it
--    (it read the old function before this one was committed), are fanned
--    out by webhooks.fan_out_outbox(), which the migration runs once and
--    every dispatcher runs every poll interval. Its index probe finds nothing
--    once they are gone.

BEGIN;

SELECT pg_advisory_xact_lock(727364591);

DO $migration$
BEGIN
IF to_regclass('webhooks.schema_version') IS NULL
   OR NOT EXISTS (SELECT FROM webhooks.schema_version WHERE version = '006') THEN
    RAISE EXCEPTION 'danbyte-webhooks: apply 006_quick_turn.sql before 007_statement_capture.sql';
END IF;
IF EXISTS (SELECT FROM webhooks.schema_version WHERE version = '007') THEN
    RAISE NOTICE 'danbyte-webhooks: migration 007 is already applied, nothing to do';
    RETURN;
END IF;

-- Captured statements, waiting for the dispatcher's fan-out, which deletes
-- them: the table holds only the queue, so it needs no index but its key.
CREATE TABLE webhooks.capture (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event       text NOT NULL,
    object_type text NOT NULL,
    key_columns text[] NOT NULL,
    changes     integer NOT NULL,
    fanned      integer NOT NULL DEFAULT 0,
    prechange   json,
    postchange  json,
    changed_at  timestamptz NOT NULL,
    db_user     text NOT NULL,
    username    text,
    request_id  text
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.05);
COMMENT ON TABLE webhooks.capture IS
    'Captured statements not yet fanned out: one row per statement (per 1,000 changed rows).';
COMMENT ON COLUMN webhooks.capture.prechange IS
    'The rows before the change (updates and deletes), as a JSON array in the statement''s order.';
COMMENT ON COLUMN webhooks.capture.postchange IS
    'The rows after the change (creates and updates), as a JSON array in the same order.';
COMMENT ON COLUMN webhooks.capture.changes IS 'How many rows the statement changed (in this row).';
COMMENT ON COLUMN webhooks.capture.fanned IS 'How many of them, from the first, are fanned out already.';
-- Change ids (capture id * 1000 + place) start above every outbox id so far,
-- with room for the few that writes still in the old capture function make.
EXECUTE format('ALTER TABLE webhooks.capture ALTER COLUMN id RESTART WITH %s',
               coalesce(pg_sequence_last_value(pg_get_serial_sequence('webhooks.outbox', 'id')), 0)
               / 1000 + 1001);

-- The id of the n-th change (from 1) of a captured statement.
CREATE FUNCTION webhooks.change_id(capture_id bigint, n bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT capture_id OPERATOR(pg_catalog.*) 1000 OPERATOR(pg_catalog.+) n OPERATOR(pg_catalog.-) 1
$fn$;

-- The changes waiting for the fan-out, one row each, as the outbox will hold
-- them. Updates that changed nothing (the same JSON text before and after)
-- are left out, and so are those fanned out already.
CREATE VIEW webhooks.captured AS
SELECT c.id AS capture_id, e.n, webhooks.change_id(c.id, e.n) AS id, c.event, c.object_type,
       webhooks.object_key(c.key_columns, e.prechange, e.postchange) AS object_id,
       e.prechange, e.postchange, c.changed_at, c.db_user, c.username, c.request_id
  FROM webhooks.capture c
 CROSS JOIN LATERAL ROWS FROM (json_array_elements(c.prechange), json_array_elements(c.postchange))
       WITH ORDINALITY AS e(prechange, postchange, n)
 WHERE e.n > c.fanned AND (c.event <> 'update' OR e.prechange::text <> e.postchange::text);
COMMENT ON VIEW webhooks.captured IS
    'Captured changes not yet fanned out, one row each, with the id the outbox will give them.';

-- The capture function. The same rules as in 005: SECURITY DEFINER without a
-- SET clause, so every name is qualified.
CREATE OR REPLACE FUNCTION webhooks.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $fn$
DECLARE
    n pg_catalog.int8;
    ts pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    who pg_catalog.text;
    uname pg_catalog.text;
    rid pg_catalog.text;
    event_bit pg_catalog.int8 := CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN 1
                                      WHEN TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN 2
                                      ELSE 4 END;
BEGIN
    -- No enabled webhook wants this event: capture nothing (see webhooks.wanted).
    IF pg_catalog.pg_sequence_last_value('webhooks.wanted'::pg_catalog.regclass)
       OPERATOR(pg_catalog.&) event_bit OPERATOR(pg_catalog.=) 0 THEN
        RETURN NULL;
    END IF;
    who := CASE WHEN pg_catalog.current_setting('role') OPERATOR(pg_catalog.=) 'none'
                THEN session_user::pg_catalog.text
                ELSE pg_catalog.current_setting('role') END;
    uname := pg_catalog.current_setting('danbyte.username', true);
    rid := pg_catalog.current_setting('danbyte.request_id', true);
    IF uname OPERATOR(pg_catalog.=) '' THEN uname := NULL; END IF;
    IF rid OPERATOR(pg_catalog.=) '' THEN rid := NULL; END IF;
    -- One row for the statement if it changed 1,000 rows or fewer: the
    -- LIMIT tells, for the cost of one node. (A statement trigger fires for
    -- statements that changed no row too: they capture nothing.)
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO webhooks.capture
            (event, object_type, key_columns, changes, postchange, changed_at, db_user, username, request_id)
        SELECT 'create', TG_ARGV[0], TG_ARGV[1:], s.n, s.r, ts, who, uname, rid
          FROM (SELECT pg_catalog.count(*) AS n, pg_catalog.json_agg(x.r) AS r
                  FROM (SELECT t AS r FROM danbyte_new t LIMIT 1001) x) s
         WHERE s.n OPERATOR(pg_catalog.>) 0 AND s.n OPERATOR(pg_catalog.<=) 1000;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        -- The two arrays pair up by position: PostgreSQL appends the old and
        -- the new version of each updated row to the two transition tables
        -- together (see 001).
        INSERT INTO webhooks.capture
            (event, object_type, key_columns, changes, prechange, postchange, changed_at, db_user,
             username, request_id)
        SELECT 'update', TG_ARGV[0], TG_ARGV[1:], b.n, b.r,
               (SELECT pg_catalog.json_agg(t) FROM danbyte_new t), ts, who, uname, rid
          FROM (SELECT pg_catalog.count(*) AS n, pg_catalog.json_agg(x.r) AS r
                  FROM (SELECT t AS r FROM danbyte_old t LIMIT 1001) x) b
         WHERE b.n OPERATOR(pg_catalog.>) 0 AND b.n OPERATOR(pg_catalog.<=) 1000;
    ELSE
        INSERT INTO webhooks.capture
            (event, object_type, key_columns, changes, prechange, changed_at, db_user, username, request_id)
        SELECT 'delete', TG_ARGV[0], TG_ARGV[1:], s.n, s.r, ts, who, uname, rid
          FROM (SELECT pg_catalog.count(*) AS n, pg_catalog.json_agg(x.r) AS r
                  FROM (SELECT t AS r FROM danbyte_old t LIMIT 1001) x) s
         WHERE s.n OPERATOR(pg_catalog.>) 0 AND s.n OPERATOR(pg_catalog.<=) 1000;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    -- More than 1,000 rows (or none): 1,000 at a time, since a JSON value
    -- cannot exceed 1 GB.
    IF n OPERATOR(pg_catalog.=) 0 THEN
        IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
            INSERT INTO webhooks.capture
                (event, object_type, key_columns, changes, prechange, postchange, changed_at, db_user,
                 username, request_id)
            SELECT 'update', TG_ARGV[0], TG_ARGV[1:], pg_catalog.count(*),
                   pg_catalog.json_agg(b.r ORDER BY b.i), pg_catalog.json_agg(a.r ORDER BY a.i),
                   ts, who, uname, rid
              FROM (SELECT pg_catalog.row_number() OVER () AS i, pg_catalog.to_json(t) AS r
                      FROM danbyte_old t) b
              JOIN (SELECT pg_catalog.row_number() OVER () AS i, pg_catalog.to_json(t) AS r
                      FROM danbyte_new t) a
                ON a.i OPERATOR(pg_catalog.=) b.i
             GROUP BY (b.i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000
             ORDER BY (b.i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000;
        ELSIF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
            INSERT INTO webhooks.capture
                (event, object_type, key_columns, changes, postchange, changed_at, db_user, username,
                 request_id)
            SELECT 'create', TG_ARGV[0], TG_ARGV[1:], pg_catalog.count(*),
                   pg_catalog.json_agg(s.r ORDER BY s.i), ts, who, uname, rid
              FROM (SELECT pg_catalog.row_number() OVER () AS i, pg_catalog.to_json(t) AS r
                      FROM danbyte_new t) s
             GROUP BY (s.i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000
             ORDER BY (s.i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000;
        ELSE
            INSERT INTO webhooks.capture
                (event, object_type, key_columns, changes, prechange, changed_at, db_user, username,
                 request_id)
            SELECT 'delete', TG_ARGV[0], TG_ARGV[1:], pg_catalog.count(*),
                   pg_catalog.json_agg(s.r ORDER BY s.i), ts, who, uname, rid
              FROM (SELECT pg_catalog.row_number() OVER () AS i, pg_catalog.to_json(t) AS r
                      FROM danbyte_old t) s
             GROUP BY (s.i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000
             ORDER BY (s.i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000;
        END IF;
        GET DIAGNOSTICS n = ROW_COUNT;
    END IF;
    IF n OPERATOR(pg_catalog.>) 0
       -- A plain expression, not a query (see 005).
       AND pg_catalog.pg_sequence_last_value('webhooks.wake'::pg_catalog.regclass)
           OPERATOR(pg_catalog.>) pg_catalog.date_part('epoch', pg_catalog.now()) THEN
        PERFORM pg_catalog.pg_notify('danbyte_webhooks', '');
    END IF;
    RETURN NULL;
END
$fn$;

-- Changes captured into the outbox by the capture function of 001-006 and
-- not fanned out yet: fanned out here into pending deliveries, as 006's turn
-- did (same matching, same delivery ids). Returns how many were taken.
CREATE FUNCTION webhooks.fan_out_outbox() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off AS $fn$
DECLARE
    taken integer;
BEGIN
    WITH batch AS (
        SELECT id, event, object_type, changed_at FROM webhooks.outbox
         WHERE dispatched_at IS NULL
         ORDER BY id
           FOR UPDATE SKIP LOCKED
    ), matched AS (
        SELECT b.id, b.changed_at, w.id AS webhook_id, w.name, w.max_attempts
          FROM batch b
          JOIN webhooks.webhook w
            ON w.enabled
           AND b.event = ANY (w.triggers)
           AND (w.object_types IS NULL OR b.object_type = ANY (w.object_types))
           AND b.changed_at >= w.enabled_at
    ), marked AS (
        UPDATE webhooks.outbox o
           SET dispatched_at = now(),
               object_id = CASE WHEN o.key_columns IS NULL THEN o.object_id
                                ELSE webhooks.object_key(o.key_columns, o.prechange, o.postchange) END,
               key_columns = NULL
         WHERE o.id = ANY (ARRAY(SELECT DISTINCT id FROM matched))
        RETURNING o.id, o.event, o.object_type, o.object_id
    ), dropped AS (
        DELETE FROM webhooks.outbox o
         WHERE o.id = ANY (ARRAY(SELECT id FROM batch EXCEPT SELECT id FROM matched))
    ), created AS (
        INSERT INTO webhooks.delivery
            (id, outbox_id, webhook_id, webhook_name, event, object_type, object_id, max_attempts, state)
        SELECT webhooks.delivery_uuid(m.id, x.webhook_id, x.changed_at), m.id, x.webhook_id, x.name,
               m.event, m.object_type, m.object_id, x.max_attempts, 'pending'
          FROM marked m JOIN matched x ON x.id = m.id
         ORDER BY m.id, x.webhook_id
    )
    SELECT count(*) INTO taken FROM batch;
    RETURN taken;
END
$fn$;

-- The dispatcher's turn: as in 006, except that the fan-out takes captured
-- changes, oldest first, up to its limit (a statement's changes in order, a
-- big statement over several turns), and writes the outbox rows of the
-- changes some webhook wants, already dispatched. The other changes are
-- dropped with their statement.
CREATE OR REPLACE FUNCTION webhooks.dispatch_turn(
    me text, results jsonb, disable jsonb, fan_out_limit integer, claim_limit integer,
    per_webhook integer, full_ids bigint[], busy_ids bigint[], busy_room integer[],
    lease double precision, default_timeout double precision, slack double precision)
RETURNS json
-- As in 006: no sequential scans, no JIT, always the cached plans.
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    changes integer := 0;
    jobs json;
    claimed_ids uuid[] := '{}';
    claimed_for bigint[] := '{}';  -- the webhook of each claimed_ids
    leased_ids uuid[] := '{}';
    fan_limit integer := fan_out_limit;
BEGIN
    -- As in 006: the turn commits without waiting for its WAL flush. A lost
    -- fan-out leaves its statements in webhooks.capture, to be unpacked
    -- again into the same change and delivery ids.
    PERFORM set_config('synchronous_commit', 'off', true);
    IF jsonb_array_length(results) > 0 THEN
        WITH r AS (
            SELECT * FROM jsonb_to_recordset(results)
              AS r(id uuid, attempt int, outcome text, state text, retry_in float8, status int,
                   error text, duration_ms float8, attempted_at timestamptz, method text,
                   url text, req_headers jsonb, resp_headers jsonb, resp_body text)
        ), upd AS (
            UPDATE webhooks.delivery d
               SET state = r.state,
                   attempts = r.attempt,
                   status_code = r.status,
                   error = r.error,
                   due_at = CASE WHEN r.state = 'pending'
                                 THEN now() + r.retry_in * interval '1 second' ELSE d.due_at END,
                   finished_at = CASE WHEN r.state = 'pending' THEN NULL ELSE now() END,
                   claimed_by = NULL,
                   lease_until = NULL
              FROM r
             -- = ANY (ARRAY(...)): always the primary key, whatever the row estimates.
             WHERE d.id = ANY (ARRAY(SELECT id FROM r)) AND d.id = r.id
               AND d.state = 'sending' AND d.claimed_by = me
            RETURNING d.id
        )
        INSERT INTO webhooks.delivery_attempt
            (delivery_id, attempt, attempted_at, duration_ms, dispatcher, outcome, request_method,
             request_url, request_headers, status_code, response_headers, response_body, error)
        SELECT r.id, r.attempt, r.attempted_at, r.duration_ms, me, r.outcome, r.method, r.url,
               r.req_headers, r.status, r.resp_headers, r.resp_body, r.error
          FROM r;
    END IF;
    IF jsonb_array_length(disable) > 0 THEN
        -- A 410 Gone disables its webhook, with the reason.
        UPDATE webhooks.webhook w
           SET enabled = false,
               disabled_reason = g.reason || ' (at ' || to_char(now(), 'YYYY-MM-DD HH24:MI:SS TZ') || ')'
          FROM (SELECT DISTINCT ON (x.webhook_id) x.webhook_id, x.reason
                  FROM jsonb_to_recordset(disable) AS x(webhook_id bigint, reason text)) g
         WHERE w.id = g.webhook_id AND w.enabled;
    END IF;

    IF claim_limit > 0 THEN
        WITH hooks AS (
            SELECT w.id, w.enabled, coalesce(b.room, per_webhook) AS room
              FROM webhooks.webhook w
              LEFT JOIN unnest(busy_ids, busy_room) AS b(webhook_id, room)
                ON b.webhook_id = w.id
             WHERE w.id <> ALL (full_ids)
        ), locked AS (
            -- Per webhook, its oldest due deliveries up to the room it has left: a
            -- webhook at its concurrency limit, however long its queue, costs nothing.
            SELECT d.id, d.due_at, d.seq
              FROM hooks h
             CROSS JOIN LATERAL (
                    SELECT d.id, d.due_at, d.seq
                      FROM webhooks.delivery d
                     WHERE d.webhook_id = h.id AND d.state = 'pending' AND d.due_at <= now()
                       AND (h.enabled OR d.is_test)
                     ORDER BY d.due_at, d.seq
                     LIMIT h.room
                     -- SKIP LOCKED: rows another dispatcher is claiming right now are
                     -- passed over, so the LIMIT counts rows we can actually take.
                       FOR UPDATE SKIP LOCKED) d
             ORDER BY d.due_at, d.seq
             LIMIT claim_limit
        ), claimed AS (
            UPDATE webhooks.delivery d
               SET state = 'sending', claimed_by = me,
                   lease_until = now() + greatest(lease, coalesce(w.timeout_seconds, default_timeout) + slack)
                                         * interval '1 second'
              FROM webhooks.webhook w
             WHERE d.id = ANY (ARRAY(SELECT id FROM locked)) AND w.id = d.webhook_id
            RETURNING d.id, d.webhook_id
        )
        SELECT coalesce(array_agg(id), '{}'), coalesce(array_agg(webhook_id), '{}')
          INTO claimed_ids, claimed_for
          FROM claimed;
        -- No more changes than the claim left room for (see 006).
        fan_limit := least(fan_out_limit, claim_limit - cardinality(claimed_ids));
    END IF;
    IF fan_limit > 0 THEN
        WITH locked AS (
            SELECT c.id, c.fanned, c.changes - c.fanned AS waiting FROM webhooks.capture c
             ORDER BY c.id
             -- Only as many statements as the limit needs, counted over all of
             -- them: a turn that locked every statement it could see would leave
             -- the other dispatchers nothing to take.
             LIMIT (SELECT count(*)
                      FROM (SELECT sum(p.changes - p.fanned) OVER (ORDER BY p.id)
                                   - (p.changes - p.fanned) AS before
                              FROM webhooks.capture p
                             ORDER BY p.id
                             LIMIT fan_limit) p
                     WHERE p.before < fan_limit)
             -- SKIP LOCKED: concurrent dispatchers take disjoint statements instead
             -- of queueing behind each other's row locks.
               FOR UPDATE SKIP LOCKED
        ), batch AS (
            -- Oldest first, as many changes as the limit: the last statement
            -- taken may be taken in part (its first changes), the rest of it
            -- waits for the next turn.
            SELECT l.id, l.fanned, least(l.waiting, fan_limit - l.before) AS take, l.waiting
              FROM (SELECT l.*, sum(l.waiting) OVER (ORDER BY l.id) - l.waiting AS before
                      FROM locked l) l
             WHERE l.before < fan_limit
        ), taken AS (
            DELETE FROM webhooks.capture c
             WHERE c.id = ANY (ARRAY(SELECT b.id FROM batch b WHERE b.take = b.waiting))
        ), partly AS (
            UPDATE webhooks.capture c SET fanned = c.fanned + b.take
              FROM batch b
             WHERE c.id = ANY (ARRAY(SELECT b.id FROM batch b WHERE b.take < b.waiting))
               AND c.id = b.id
        ), changed AS (
            -- From b.fanned, not the view's own count: the view reads the
            -- statement's snapshot, which may predate another dispatcher's
            -- turn that took part of the statement and committed before we
            -- locked it, while the lock returns the latest row.
            SELECT x.*
              FROM webhooks.captured x
              JOIN batch b ON b.id = x.capture_id
             WHERE x.capture_id = ANY (ARRAY(SELECT id FROM batch))
               AND x.n > b.fanned AND x.n <= b.fanned + b.take
        ), matched AS (
            -- Each change with each enabled webhook that wants it.
            SELECT c.id, c.changed_at, w.id AS webhook_id, w.name, w.max_attempts, w.timeout_seconds
              FROM changed c
              JOIN webhooks.webhook w
                ON w.enabled
               AND c.event = ANY (w.triggers)
               AND (w.object_types IS NULL OR c.object_type = ANY (w.object_types))
               AND c.changed_at >= w.enabled_at
        ), kept AS (
            -- Only the changes some webhook wants are kept.
            INSERT INTO webhooks.outbox
                (id, event, object_type, object_id, prechange, postchange, changed_at, db_user, username,
                 request_id, dispatched_at)
            OVERRIDING SYSTEM VALUE
            SELECT c.id, c.event, c.object_type, c.object_id, c.prechange, c.postchange, c.changed_at,
                   c.db_user, c.username, c.request_id, now()
              FROM changed c
             WHERE c.id = ANY (ARRAY(SELECT DISTINCT id FROM matched))
            RETURNING id, event, object_type, object_id
        ), room AS (
            -- What each webhook may still be leased in this turn (see 006).
            SELECT h.webhook_id,
                   CASE WHEN h.webhook_id = ANY (full_ids) THEN 0
                        ELSE coalesce((SELECT b.room FROM unnest(busy_ids, busy_room) AS b(webhook_id, room)
                                        WHERE b.webhook_id = h.webhook_id), per_webhook)
                             - (SELECT count(*) FROM unnest(claimed_for) AS c(webhook_id)
                                 WHERE c.webhook_id = h.webhook_id) END AS n
              FROM (SELECT DISTINCT webhook_id FROM matched) h
        ), fits AS (
            SELECT m.id, x.webhook_id, x.name, m.event, m.object_type, m.object_id, x.max_attempts,
                   x.timeout_seconds, x.changed_at,
                   row_number() OVER (PARTITION BY x.webhook_id ORDER BY m.id) <= r.n AS fits
              FROM kept m
              JOIN matched x ON x.id = m.id
              JOIN room r ON r.webhook_id = x.webhook_id
        ), picked AS (
            -- ... and the turn's limit over all webhooks, oldest change first.
            SELECT f.*,
                   f.fits AND count(*) FILTER (WHERE f.fits) OVER (ORDER BY f.id, f.webhook_id)
                              <= claim_limit - cardinality(claimed_ids) AS leased
              FROM fits f
        ), created AS (
            INSERT INTO webhooks.delivery
                (id, outbox_id, webhook_id, webhook_name, event, object_type, object_id, max_attempts,
                 state, claimed_by, lease_until)
            SELECT webhooks.delivery_uuid(p.id, p.webhook_id, p.changed_at), p.id, p.webhook_id, p.name,
                   p.event, p.object_type, p.object_id, p.max_attempts,
                   CASE WHEN p.leased THEN 'sending' ELSE 'pending' END,
                   CASE WHEN p.leased THEN me END,
                   CASE WHEN p.leased
                        THEN now() + greatest(lease, coalesce(p.timeout_seconds, default_timeout) + slack)
                                     * interval '1 second' END
              FROM picked p
             ORDER BY p.id, p.webhook_id
            RETURNING id, state
        )
        -- (taken and partly run too: PostgreSQL always runs data-modifying WITH
        -- queries.)
        SELECT (SELECT coalesce(sum(b.take), 0) FROM batch b),
               coalesce((SELECT array_agg(c.id) FROM created c WHERE c.state = 'sending'), '{}')
          INTO changes, leased_ids;
    END IF;

    IF cardinality(claimed_ids) + cardinality(leased_ids) > 0 THEN
        SELECT json_agg(j ORDER BY j.due_at, j.seq) INTO jobs
          FROM webhooks.job j
         WHERE j.delivery_id = ANY (claimed_ids || leased_ids);
    END IF;
    RETURN json_build_object('changes', changes,
                             'more', CASE WHEN fan_limit > 0 THEN changes >= fan_limit END,
                             'jobs', coalesce(jobs, '[]'::json));
END
$fn$;

-- The backlog is the captured changes, plus any left in the outbox by the
-- capture function of 001-006 (see fan_out_outbox).
CREATE OR REPLACE VIEW webhooks.status AS
SELECT (SELECT max(version) FROM webhooks.schema_version) AS schema_version,
       (SELECT count(*) FROM webhooks.dispatcher
         WHERE seen_at > now() - interval '1 minute') AS dispatchers_alive,
       (SELECT max(seen_at) FROM webhooks.dispatcher) AS last_dispatcher_seen_at,
       (SELECT coalesce(sum(changes - fanned), 0) FROM webhooks.capture)
       + (SELECT count(*) FROM webhooks.outbox WHERE dispatched_at IS NULL) AS outbox_backlog,
       (SELECT count(*) FROM webhooks.delivery
         WHERE state = 'pending' AND due_at <= now()) AS deliveries_due,
       (SELECT count(*) FROM webhooks.delivery WHERE state = 'sending') AS deliveries_in_flight,
       (SELECT count(*) FROM webhooks.delivery
         WHERE state = 'pending' AND due_at > now()) AS retries_scheduled,
       u.oldest AS oldest_undelivered_at,
       extract(epoch FROM now() - u.oldest)::double precision AS oldest_undelivered_age_seconds
  FROM (SELECT least((SELECT c.changed_at FROM webhooks.capture c ORDER BY c.id LIMIT 1),
                     (SELECT o.changed_at FROM webhooks.outbox o
                       WHERE o.dispatched_at IS NULL ORDER BY o.id LIMIT 1),
                     (SELECT min(d.due_at) FROM webhooks.delivery d
                       WHERE d.state = 'pending' AND d.due_at <= now())) AS oldest) u;

REVOKE ALL ON webhooks.capture, webhooks.captured FROM PUBLIC;
REVOKE ALL ON FUNCTION webhooks.fan_out_outbox() FROM PUBLIC;
GRANT SELECT ON webhooks.capture, webhooks.captured TO danbyte_dispatcher;
GRANT DELETE ON webhooks.capture TO danbyte_dispatcher;
GRANT UPDATE (fanned) ON webhooks.capture TO danbyte_dispatcher;
GRANT INSERT ON webhooks.outbox TO danbyte_dispatcher;
GRANT EXECUTE ON FUNCTION webhooks.fan_out_outbox() TO danbyte_dispatcher;

PERFORM webhooks.fan_out_outbox();

INSERT INTO webhooks.schema_version (version, name) VALUES ('007', 'statement_capture');
END
$migration$;

COMMIT;
