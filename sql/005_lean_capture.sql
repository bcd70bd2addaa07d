-- Danbyte Webhooks, migration 005: a capture trigger that does less.
-- Apply after 004_dispatch.sql, the same way (psql or `danbyte-webhooks migrate`).
--
-- Three costs leave the application's write path (instructions counted with
-- valgrind for a single-row INSERT into a watched table; see the README's
-- Benchmarks, `python -m tests.bench.instructions`): 180,000 added
-- instructions become about 114,000.
--  * The CHECK on outbox.event (35,000 per statement: PostgreSQL parses and
--    plans a table's CHECK expressions again in every statement). Only the
--    capture trigger writes the outbox, and it writes the three events.
--  * The object id (26,000 per statement, 12,600 per row: reading the key out
--    of the row's JSON parses the JSON). The trigger now records the key
--    columns; the dispatcher works the id out when it fans the change out.
--  * The query for an idle dispatcher (19,000 per statement). The triggers
--    read a sequence instead, which webhooks.dispatcher keeps up to date.
-- And a statement whose event (create, update or delete) no enabled webhook
-- wants is not captured at all: its trigger only reads a sequence (see
-- webhooks.wanted below). Changes are only ever matched to webhooks enabled
-- before they were made, so nothing that could be delivered is skipped.
-- The dispatcher's fan-out deletes a change that no webhook wants rather
-- than marking it dispatched: it was the dispatcher's main cost (in WAL and
-- in commits competing with the application's) while the writes it sees
-- concern no webhook.
-- The watched tables' triggers keep pointing at the same function, so nothing
-- needs to be watched again.

BEGIN;

SELECT pg_advisory_xact_lock(727364591);

DO $migration$
BEGIN
IF to_regclass('webhooks.schema_version') IS NULL
   OR NOT EXISTS (SELECT FROM webhooks.schema_version WHERE version = '004') THEN
    RAISE EXCEPTION 'danbyte-webhooks: apply 004_dispatch.sql before 005_lean_capture.sql';
END IF;
IF EXISTS (SELECT FROM webhooks.schema_version WHERE version = '005') THEN
    RAISE NOTICE 'danbyte-webhooks: migration 005 is already applied, nothing to do';
    RETURN;
END IF;

ALTER TABLE webhooks.outbox DROP CONSTRAINT IF EXISTS outbox_event_check;
ALTER TABLE webhooks.outbox ADD COLUMN key_columns text[];
COMMENT ON COLUMN webhooks.outbox.key_columns IS
    'Primary key columns of the captured row, until the dispatcher has set object_id from them.';
COMMENT ON COLUMN webhooks.outbox.object_id IS
    'The object''s primary key value (an object for composite keys); set when the change is dispatched.';

-- The object id of a change: its row's primary key value, or an object of
-- them for a composite key; NULL for a table without a primary key. The new
-- row's for creates and updates, the old row's for deletes.
CREATE FUNCTION webhooks.object_key(keys text[], prechange json, postchange json) RETURNS json
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE pg_catalog.cardinality(keys)
           WHEN 0 THEN NULL
           WHEN 1 THEN COALESCE(postchange, prechange) OPERATOR(pg_catalog.->) keys[1]
           ELSE webhooks.key_json(COALESCE(postchange, prechange), keys) END
$fn$;
GRANT EXECUTE ON FUNCTION webhooks.key_json(json, text[]) TO danbyte_dispatcher;
GRANT UPDATE (object_id, key_columns) ON webhooks.outbox TO danbyte_dispatcher;

-- The wake-up flag: while now() is before this many seconds since the epoch,
-- some live dispatcher is idle and waits for a NOTIFY. A sequence, because
-- the triggers can read it with a function call instead of a query, and
-- because setting it is not transactional: it holds as soon as it is set.
CREATE SEQUENCE webhooks.wake AS bigint MINVALUE 0;
COMMENT ON SEQUENCE webhooks.wake IS
    'Capture triggers NOTIFY while now() is before this epoch second; kept by webhooks.dispatcher.';

CREATE FUNCTION webhooks.refresh_wake() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- One at a time, so the last to set the flag has seen every other
    -- dispatcher's committed state: two dispatchers going idle and busy at
    -- the same moment cannot leave it down while one of them waits.
    PERFORM pg_advisory_xact_lock(727364592);
    -- An idle dispatcher counts until a minute after it was last heard from.
    PERFORM setval('webhooks.wake',
                   coalesce((SELECT ceil(extract(epoch FROM max(d.seen_at) + interval '1 minute'))::bigint
                               FROM webhooks.dispatcher d WHERE d.idle), 0));
END
$fn$;

CREATE FUNCTION webhooks.dispatcher_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM webhooks.refresh_wake();
    RETURN NULL;
END
$fn$;

CREATE TRIGGER dispatcher_changed AFTER INSERT OR UPDATE OR DELETE ON webhooks.dispatcher
    FOR EACH STATEMENT EXECUTE FUNCTION webhooks.dispatcher_changed();
PERFORM webhooks.refresh_wake();
REVOKE ALL ON FUNCTION webhooks.refresh_wake() FROM PUBLIC;
REVOKE ALL ON FUNCTION webhooks.dispatcher_changed() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION webhooks.refresh_wake() TO danbyte_dispatcher;

-- The events some enabled webhook wants, as bits: 1 create, 2 update, 4
-- delete. The capture triggers skip the others. A webhook that is enabled, or
-- made to want more, raises its bits at once, before its enabled_at is set:
-- a change made after enabled_at was made after the bits were up, so it is
-- captured. Bits are only lowered from committed state, by
-- webhooks.refresh_wanted(), which the dispatcher runs every poll interval: a
-- disable that is rolled back must not leave them down.
CREATE SEQUENCE webhooks.wanted AS bigint MINVALUE 0;
COMMENT ON SEQUENCE webhooks.wanted IS
    'Events some enabled webhook wants (1 create, 2 update, 4 delete): the capture triggers skip the rest.';

CREATE FUNCTION webhooks.event_bits(triggers text[]) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(bit_or(CASE t WHEN 'create' THEN 1 WHEN 'update' THEN 2 WHEN 'delete' THEN 4 END), 0)::bigint
      FROM unnest(triggers) AS t
$fn$;

CREATE FUNCTION webhooks.want(triggers text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    bits bigint := webhooks.event_bits(triggers);
    have bigint;
BEGIN
    -- Held until this transaction ends: refresh_wanted() must not lower the
    -- bits from a state that does not show this webhook yet.
    PERFORM pg_advisory_xact_lock(727364593);
    have := coalesce(pg_sequence_last_value('webhooks.wanted'), 0);
    IF have & bits <> bits THEN
        PERFORM setval('webhooks.wanted', have | bits);
    END IF;
END
$fn$;

CREATE FUNCTION webhooks.refresh_wanted() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    bits bigint;
BEGIN
    -- A webhook being enabled holds the lock until it commits; try again at
    -- the next round rather than wait for it.
    IF NOT pg_try_advisory_xact_lock(727364593) THEN
        RETURN NULL;
    END IF;
    bits := (SELECT coalesce(bit_or(webhooks.event_bits(w.triggers)), 0)
               FROM webhooks.webhook w WHERE w.enabled);
    IF bits IS DISTINCT FROM pg_sequence_last_value('webhooks.wanted') THEN
        PERFORM setval('webhooks.wanted', bits);
    END IF;
    RETURN bits;
END
$fn$;
REVOKE ALL ON FUNCTION webhooks.want(text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION webhooks.refresh_wanted() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION webhooks.want(text[]) TO danbyte_integrations, danbyte_dispatcher;
GRANT EXECUTE ON FUNCTION webhooks.refresh_wanted() TO danbyte_dispatcher;
PERFORM webhooks.refresh_wanted();

-- As in 001, raising the wanted bits first.
CREATE OR REPLACE FUNCTION webhooks.webhook_before_write() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NEW.enabled THEN
        PERFORM webhooks.want(NEW.triggers);
    END IF;
    IF TG_OP = 'INSERT' THEN
        NEW.created_at := now();
        NEW.enabled_at := CASE WHEN NEW.enabled THEN clock_timestamp() END;
    ELSE
        NEW.created_at := OLD.created_at;
        IF NEW.enabled AND NOT OLD.enabled THEN
            NEW.enabled_at := clock_timestamp();
            NEW.disabled_reason := NULL;
        ELSIF NEW.enabled THEN
            NEW.enabled_at := OLD.enabled_at;
        END IF;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$fn$;

-- The capture function, as in 003 with the changes above. The same rules
-- hold: SECURITY DEFINER without a SET clause, so every name is qualified.
CREATE OR REPLACE FUNCTION webhooks.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $fn$
DECLARE
    keys pg_catalog.text[];
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
    keys := TG_ARGV[1:];
    who := CASE WHEN pg_catalog.current_setting('role') OPERATOR(pg_catalog.=) 'none'
                THEN session_user::pg_catalog.text
                ELSE pg_catalog.current_setting('role') END;
    uname := pg_catalog.current_setting('danbyte.username', true);
    rid := pg_catalog.current_setting('danbyte.request_id', true);
    IF uname OPERATOR(pg_catalog.=) '' THEN uname := NULL; END IF;
    IF rid OPERATOR(pg_catalog.=) '' THEN rid := NULL; END IF;
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO webhooks.outbox
            (event, object_type, key_columns, prechange, postchange, changed_at, db_user, username, request_id)
        SELECT 'create', TG_ARGV[0],
               keys,
               NULL, s.r, ts, who, uname, rid
          FROM (SELECT pg_catalog.to_json(t) AS r FROM danbyte_new t) s;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        INSERT INTO webhooks.outbox
            (event, object_type, key_columns, prechange, postchange, changed_at, db_user, username, request_id)
        SELECT 'update', TG_ARGV[0],
               keys,
               b.r, a.r, ts, who, uname, rid
          FROM (SELECT pg_catalog.row_number() OVER () AS i, pg_catalog.to_json(t) AS r
                  FROM danbyte_old t) b
          JOIN (SELECT pg_catalog.row_number() OVER () AS i, pg_catalog.to_json(t) AS r
                  FROM danbyte_new t) a
            ON a.i OPERATOR(pg_catalog.=) b.i
         WHERE a.r::pg_catalog.text OPERATOR(pg_catalog.<>) b.r::pg_catalog.text;
    ELSE
        INSERT INTO webhooks.outbox
            (event, object_type, key_columns, prechange, postchange, changed_at, db_user, username, request_id)
        SELECT 'delete', TG_ARGV[0],
               keys,
               s.r, NULL, ts, who, uname, rid
          FROM (SELECT pg_catalog.to_json(t) AS r FROM danbyte_old t) s;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n OPERATOR(pg_catalog.>) 0
       -- A plain expression, not a query: plpgsql evaluates it without the
       -- executor (a query here cost 19,000 instructions per statement).
       AND pg_catalog.pg_sequence_last_value('webhooks.wake'::pg_catalog.regclass)
           OPERATOR(pg_catalog.>) pg_catalog.date_part('epoch', pg_catalog.now()) THEN
        PERFORM pg_catalog.pg_notify('danbyte_webhooks', '');
    END IF;
    RETURN NULL;
END
$fn$;

-- The dispatcher's turn, as in 004, except in its fan-out: it works out the
-- object id, and deletes a change that no webhook wants instead of marking it.
CREATE OR REPLACE FUNCTION webhooks.dispatch_turn(
    me text, results jsonb, disable jsonb, fan_out_limit integer, claim_limit integer,
    per_webhook integer, full_ids bigint[], busy_ids bigint[], busy_room integer[],
    lease double precision, default_timeout double precision, slack double precision)
RETURNS json
-- No sequential scans: every statement below finds its rows through an
-- index. The cached (generic) plans of this function are made once per
-- session, and one made while the queue tables were small (just after the
-- migration, or after a quiet spell) would otherwise keep scanning them whole
-- once they have grown. Planning every statement on every turn instead would
-- cost about 1.5 ms of server time per turn, 200 times a second while polling.
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
-- No JIT, whatever the connection asks for: with sequential scans disabled a
-- plan's cost can exceed jit_above_cost, and compiling it took a second.
SET jit = off AS $fn$
DECLARE
    changes integer := 0;
    jobs json;
BEGIN
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

    IF fan_out_limit > 0 THEN
        WITH batch AS (
            SELECT id, event, object_type, changed_at FROM webhooks.outbox
             WHERE dispatched_at IS NULL
             ORDER BY id
             LIMIT fan_out_limit
             -- SKIP LOCKED: concurrent dispatchers take disjoint batches instead of
             -- queueing behind each other's row locks.
               FOR UPDATE SKIP LOCKED
        ), matched AS (
            -- Each change with each enabled webhook that wants it.
            SELECT b.id, w.id AS webhook_id, w.name, w.max_attempts
              FROM batch b
              JOIN webhooks.webhook w
                ON w.enabled
               AND b.event = ANY (w.triggers)
               AND (w.object_types IS NULL OR b.object_type = ANY (w.object_types))
               AND b.changed_at >= w.enabled_at
        ), marked AS (
            -- The object id, from the key columns the trigger recorded (rows
            -- captured before migration 005 have it already).
            UPDATE webhooks.outbox o
               SET dispatched_at = now(),
                   object_id = CASE WHEN o.key_columns IS NULL THEN o.object_id
                                    ELSE webhooks.object_key(o.key_columns, o.prechange, o.postchange) END,
                   key_columns = NULL
             WHERE o.id = ANY (ARRAY(SELECT DISTINCT id FROM matched))
            RETURNING o.id, o.event, o.object_type, o.object_id
        ), dropped AS (
            -- A change that no webhook wants is done with. Deleting it writes
            -- a fraction of what marking it dispatched would (a new row
            -- version and two index entries).
            DELETE FROM webhooks.outbox o
             WHERE o.id = ANY (ARRAY(SELECT id FROM batch EXCEPT SELECT id FROM matched))
        ), created AS (
            INSERT INTO webhooks.delivery
                (outbox_id, webhook_id, webhook_name, event, object_type, object_id, max_attempts)
            SELECT m.id, x.webhook_id, x.name, m.event, m.object_type, m.object_id, x.max_attempts
              FROM marked m
              JOIN matched x ON x.id = m.id
             ORDER BY m.id, x.webhook_id
            RETURNING 1
        )
        -- (marked, dropped and created run too: PostgreSQL always runs
        -- data-modifying WITH queries.)
        SELECT count(*) INTO changes FROM batch;
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
            RETURNING d.id
        )
        SELECT json_agg(j ORDER BY j.due_at, j.seq) INTO jobs
          FROM webhooks.job j
         WHERE j.delivery_id = ANY (ARRAY(SELECT id FROM claimed));
    END IF;
    RETURN json_build_object('changes', changes, 'jobs', coalesce(jobs, '[]'::json));
END
$fn$;

INSERT INTO webhooks.schema_version (version, name) VALUES ('005', 'lean_capture');
END
$migration$;

COMMIT;
