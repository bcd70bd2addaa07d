-- Danbyte Webhooks, migration 003: a cheaper capture trigger.
-- Apply after 002_operations.sql, the same way (psql or `danbyte-webhooks migrate`).
--
-- Two costs come off every captured statement (measured with single-row
-- INSERTs, see the README's Benchmarks):
--  * the object id of a table with a composite primary key was built by a
--    subquery inside the capture statement, whose mere presence cost every
--    capture about 14 microseconds; it is now a function that runs only for
--    composite keys;
--  * the SET search_path clause (about 11 microseconds); see below.
-- The watched tables' triggers keep pointing at the same function, so nothing
-- needs to be watched again.

BEGIN;

SELECT pg_advisory_xact_lock(727364591);

DO $migration$
BEGIN
IF to_regclass('webhooks.schema_version') IS NULL
   OR NOT EXISTS (SELECT FROM webhooks.schema_version WHERE version = '002') THEN
    RAISE EXCEPTION 'danbyte-webhooks: apply 002_operations.sql before 003_capture.sql';
END IF;
IF EXISTS (SELECT FROM webhooks.schema_version WHERE version = '003') THEN
    RAISE NOTICE 'danbyte-webhooks: migration 003 is already applied, nothing to do';
    RETURN;
END IF;

-- The object id of a composite key: {"col": value, ...} in key order.
-- Every name is schema-qualified, so it is safe under any search_path
-- without a SET clause (which would cost a GUC save and restore per row).
CREATE FUNCTION webhooks.key_json(r json, keys text[]) RETURNS json
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT pg_catalog.json_object_agg(k, r OPERATOR(pg_catalog.->) k)
      FROM pg_catalog.unnest(keys) AS k
$fn$;
REVOKE ALL ON FUNCTION webhooks.key_json(json, text[]) FROM PUBLIC;

-- The capture function, as in 001 but without its SET search_path clause,
-- which cost a GUC save and restore on every statement (about 11
-- microseconds, a fifth of the trigger's cost). It is SECURITY DEFINER, so it
-- must not depend on the caller's search_path: every function, operator and
-- type below is qualified with pg_catalog (OPERATOR(pg_catalog.=) and so on),
-- relations with their schema, and the transition tables are named by the
-- trigger itself. tests/test_management.py plants look-alike functions,
-- operators and types in a hostile search_path to keep it that way.
CREATE OR REPLACE FUNCTION webhooks.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $fn$
DECLARE
    n pg_catalog.int8;
    ts pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    who pg_catalog.text := CASE WHEN pg_catalog.current_setting('role') OPERATOR(pg_catalog.=) 'none'
                                THEN session_user::pg_catalog.text
                                ELSE pg_catalog.current_setting('role') END;
    uname pg_catalog.text := pg_catalog.current_setting('danbyte.username', true);
    rid pg_catalog.text := pg_catalog.current_setting('danbyte.request_id', true);
BEGIN
    IF uname OPERATOR(pg_catalog.=) '' THEN uname := NULL; END IF;
    IF rid OPERATOR(pg_catalog.=) '' THEN rid := NULL; END IF;
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO webhooks.outbox
            (event, object_type, object_id, prechange, postchange, changed_at, db_user, username, request_id)
        SELECT 'create', TG_ARGV[0],
               CASE WHEN TG_NARGS OPERATOR(pg_catalog.=) 1 THEN NULL
                    WHEN TG_NARGS OPERATOR(pg_catalog.=) 2 THEN s.r OPERATOR(pg_catalog.->) TG_ARGV[1]
                    ELSE webhooks.key_json(s.r, TG_ARGV[1:]) END,
               NULL, s.r, ts, who, uname, rid
          FROM (SELECT pg_catalog.to_json(t) AS r FROM danbyte_new t) s;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        INSERT INTO webhooks.outbox
            (event, object_type, object_id, prechange, postchange, changed_at, db_user, username, request_id)
        SELECT 'update', TG_ARGV[0],
               CASE WHEN TG_NARGS OPERATOR(pg_catalog.=) 1 THEN NULL
                    WHEN TG_NARGS OPERATOR(pg_catalog.=) 2 THEN a.r OPERATOR(pg_catalog.->) TG_ARGV[1]
                    ELSE webhooks.key_json(a.r, TG_ARGV[1:]) END,
               b.r, a.r, ts, who, uname, rid
          FROM (SELECT pg_catalog.row_number() OVER () AS i, pg_catalog.to_json(t) AS r
                  FROM danbyte_old t) b
          JOIN (SELECT pg_catalog.row_number() OVER () AS i, pg_catalog.to_json(t) AS r
                  FROM danbyte_new t) a
            ON a.i OPERATOR(pg_catalog.=) b.i
         WHERE a.r::pg_catalog.text OPERATOR(pg_catalog.<>) b.r::pg_catalog.text;
    ELSE
        INSERT INTO webhooks.outbox
            (event, object_type, object_id, prechange, postchange, changed_at, db_user, username, request_id)
        SELECT 'delete', TG_ARGV[0],
               CASE WHEN TG_NARGS OPERATOR(pg_catalog.=) 1 THEN NULL
                    WHEN TG_NARGS OPERATOR(pg_catalog.=) 2 THEN s.r OPERATOR(pg_catalog.->) TG_ARGV[1]
                    ELSE webhooks.key_json(s.r, TG_ARGV[1:]) END,
               s.r, NULL, ts, who, uname, rid
          FROM (SELECT pg_catalog.to_json(t) AS r FROM danbyte_old t) s;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n OPERATOR(pg_catalog.>) 0
       AND EXISTS (SELECT FROM webhooks.dispatcher d
                    WHERE d.idle
                      -- OPERATOR() binds left to right: the parentheses matter.
                      AND d.seen_at OPERATOR(pg_catalog.>)
                          (pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.interval '1 minute')) THEN
        PERFORM pg_catalog.pg_notify('danbyte_webhooks', '');
    END IF;
    RETURN NULL;
END
$fn$;

INSERT INTO webhooks.schema_version (version, name) VALUES ('003', 'capture');
END
$migration$;

COMMIT;
