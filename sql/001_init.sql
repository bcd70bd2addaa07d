-- Danbyte Webhooks, migration 001: schema, capture triggers, roles.
--
-- Apply with either
--   psql -v ON_ERROR_STOP=1 -f sql/001_init.sql "$DSN"
--   danbyte-webhooks migrate --dsn "$DSN"
-- The file is one transaction. Re-applying it is a no-op (it checks
-- webhooks.schema_version), and concurrent runs serialise on an advisory lock.
-- Run it as the role that should own the webhooks schema (a superuser, or the
-- database owner with CREATEROLE): see "Permissions" in the README.

BEGIN;

-- Serialise concurrent migrations of this database before touching anything.
SELECT pg_advisory_xact_lock(727364591);

CREATE SCHEMA IF NOT EXISTS webhooks;

CREATE TABLE IF NOT EXISTS webhooks.schema_version (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

DO $migration$
BEGIN
IF EXISTS (SELECT FROM webhooks.schema_version WHERE version = '001') THEN
    RAISE NOTICE 'danbyte-webhooks: migration 001 is already applied, nothing to do';
    RETURN;
END IF;

REVOKE ALL ON SCHEMA webhooks FROM PUBLIC;
REVOKE ALL ON TABLE webhooks.schema_version FROM PUBLIC;

-- Group roles. They are cluster-wide, so another database may be creating
-- them at the same moment: tolerate losing that race.
IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'danbyte_integrations') THEN
    BEGIN
        CREATE ROLE danbyte_integrations NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
END IF;
IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'danbyte_dispatcher') THEN
    BEGIN
        CREATE ROLE danbyte_dispatcher NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
END IF;

------------------------------------------------------------------------------
-- Validation. Each check raises one sentence a person can act on; the CHECK
-- constraints below call them, so SQL and the CLI get the same answer.
------------------------------------------------------------------------------

CREATE FUNCTION webhooks.check_triggers(triggers text[]) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    bad text;
BEGIN
    IF triggers IS NULL OR cardinality(triggers) = 0 THEN
        RAISE EXCEPTION 'triggers must name at least one of create, update, delete'
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT t INTO bad FROM unnest(triggers) t
     WHERE t IS NULL OR t NOT IN ('create', 'update', 'delete') LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'unknown trigger "%": use create, update or delete', coalesce(bad, 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN true;
END
$fn$;

CREATE FUNCTION webhooks.check_object_types(object_types text[]) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF object_types IS NULL THEN
        RETURN true;  -- NULL means all object types
    END IF;
    IF cardinality(object_types) = 0 THEN
        RAISE EXCEPTION 'object_types is empty: list at least one object type, or set it to NULL for all object types'
            USING ERRCODE = 'check_violation';
    END IF;
    IF EXISTS (SELECT FROM unnest(object_types) t WHERE t IS NULL OR t !~ '^\S+$') THEN
        RAISE EXCEPTION 'object_types entries must be non-empty names without spaces, such as public.orders'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN true;
END
$fn$;

CREATE FUNCTION webhooks.check_method(method text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF method IS NULL OR method NOT IN ('POST', 'PUT', 'PATCH') THEN
        RAISE EXCEPTION 'unknown method "%": use POST, PUT or PATCH', coalesce(method, 'NULL')
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN true;
END
$fn$;

CREATE FUNCTION webhooks.check_url(url text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- scheme://host[:port][/path][?query]; host is a DNS name, IPv4 or [IPv6].
    -- No credentials in the URL: they would be shown in every listing.
    IF url IS NULL
       OR length(url) > 2048
       OR url ~ '[\x00-\x20\x7f]'
       OR url !~* '^https?://(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9._-]*[a-z0-9])?)(:[0-9]{1,5})?([/?#].*)?$'
    THEN
        RAISE EXCEPTION 'payload_url must be an absolute http:// or https:// URL such as https://example.com/hooks, without spaces or credentials'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN true;
END
$fn$;

CREATE FUNCTION webhooks.check_content_type(content_type text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF content_type IS NULL
       OR content_type !~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]+/[!#$%&''*+.^_`|~0-9A-Za-z-]+( *;[^\x00-\x1f\x7f]*)?$'
    THEN
        RAISE EXCEPTION 'content_type must be a media type such as application/json'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN true;
END
$fn$;

-- Header values are never echoed: they often carry tokens.
CREATE FUNCTION webhooks.check_headers(headers text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    line text;
    lineno int := 0;
    hname text;
    hvalue text;
BEGIN
    IF headers IS NULL THEN
        RAISE EXCEPTION 'additional_headers must be text (use an empty string for none)'
            USING ERRCODE = 'check_violation';
    END IF;
    FOREACH line IN ARRAY string_to_array(headers, E'\n') LOOP
        lineno := lineno + 1;
        CONTINUE WHEN line = '';
        IF position(':' IN line) = 0 THEN
            RAISE EXCEPTION 'additional_headers line % is not "Name: value"', lineno
                USING ERRCODE = 'check_violation';
        END IF;
        hname := split_part(line, ':', 1);
        hvalue := substr(line, length(hname) + 2);
        IF hname !~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]+$' THEN
            RAISE EXCEPTION 'additional_headers line %: header name "%" is not a valid HTTP token (letters, digits and !#$%%&''*+.^_`|~- only)',
                lineno, left(regexp_replace(hname, '[\x00-\x1f\x7f]', '?', 'g'), 64)
                USING ERRCODE = 'check_violation';
        END IF;
        IF hvalue ~ '[\x00-\x08\x0a-\x1f\x7f]' THEN
            RAISE EXCEPTION 'additional_headers line %: the value of header "%" contains a control character (CR, LF or similar)', lineno, hname
                USING ERRCODE = 'check_violation';
        END IF;
        IF lower(hname) LIKE 'x-danbyte-%'
           OR lower(hname) IN ('content-length', 'host', 'transfer-encoding', 'content-type')
        THEN
            RAISE EXCEPTION 'additional_headers line %: header "%" is set by Danbyte Webhooks itself and cannot be overridden%',
                lineno, hname,
                CASE WHEN lower(hname) = 'content-type' THEN ' (use content_type)' ELSE '' END
                USING ERRCODE = 'check_violation';
        END IF;
    END LOOP;
    RETURN true;
END
$fn$;

------------------------------------------------------------------------------
-- Tables
------------------------------------------------------------------------------

CREATE TABLE webhooks.webhook (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name               text NOT NULL
                       CONSTRAINT webhook_name_unique UNIQUE
                       CONSTRAINT webhook_name_not_blank CHECK (name ~ '\S' AND length(name) <= 200),
    enabled            boolean NOT NULL DEFAULT true,
    object_types       text[] CHECK (webhooks.check_object_types(object_types)),
    triggers           text[] NOT NULL DEFAULT '{create,update,delete}'
                       CHECK (webhooks.check_triggers(triggers)),
    method             text NOT NULL DEFAULT 'POST' CHECK (webhooks.check_method(method)),
    payload_url        text NOT NULL CHECK (webhooks.check_url(payload_url)),
    content_type       text NOT NULL DEFAULT 'application/json'
                       CHECK (webhooks.check_content_type(content_type)),
    secret             text CONSTRAINT webhook_secret_not_empty CHECK (secret <> ''),
    additional_headers text NOT NULL DEFAULT '' CHECK (webhooks.check_headers(additional_headers)),
    verify_tls         boolean NOT NULL DEFAULT true,
    timeout_seconds    double precision
                       CONSTRAINT webhook_timeout_range CHECK (timeout_seconds > 0 AND timeout_seconds <= 300),
    max_attempts       integer NOT NULL DEFAULT 1
                       CONSTRAINT webhook_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 50),
    retry_on_4xx       boolean NOT NULL DEFAULT false,
    disabled_reason    text,
    enabled_at         timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE webhooks.webhook IS 'Webhook definitions. The secret column is write-only for danbyte_integrations.';
COMMENT ON COLUMN webhooks.webhook.object_types IS 'Object types that fire this webhook; NULL means all object types.';
COMMENT ON COLUMN webhooks.webhook.timeout_seconds IS 'Per-request timeout; NULL uses the dispatcher''s --default-timeout.';
COMMENT ON COLUMN webhooks.webhook.max_attempts IS 'Delivery attempts before a delivery is failed; 1 (the default) is best-effort with no retry.';
COMMENT ON COLUMN webhooks.webhook.enabled_at IS 'When the webhook was last enabled: only changes made after it are delivered.';

-- Captured changes. Written by the capture triggers, read by the dispatcher.
-- json (not jsonb) keeps the column order of the row and is cheaper to build.
CREATE TABLE webhooks.outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event         text NOT NULL CHECK (event IN ('create', 'update', 'delete')),
    object_type   text NOT NULL,
    object_id     json,
    prechange     json,
    postchange    json,
    changed_at    timestamptz NOT NULL,
    db_user       text NOT NULL,
    username      text,
    request_id    text,
    dispatched_at timestamptz
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.05);
-- The dispatcher's queue: only undispatched rows, so delivered history never
-- slows the claim.
CREATE INDEX outbox_pending ON webhooks.outbox (id) WHERE dispatched_at IS NULL;
CREATE INDEX outbox_dispatched_at ON webhooks.outbox (dispatched_at) WHERE dispatched_at IS NOT NULL;

-- One row per (change, matching webhook), plus test deliveries. The id is the
-- X-Danbyte-Delivery header, the same on every attempt and redelivery.
CREATE TABLE webhooks.delivery (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    outbox_id    bigint,
    webhook_id   bigint NOT NULL,
    webhook_name text NOT NULL,
    event        text NOT NULL CHECK (event IN ('create', 'update', 'delete', 'test')),
    object_type  text,
    object_id    json,
    is_test      boolean NOT NULL DEFAULT false,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'sending', 'succeeded', 'failed', 'cancelled')),
    attempts     integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 1,
    due_at       timestamptz NOT NULL DEFAULT now(),
    lease_until  timestamptz,
    claimed_by   text,
    status_code  integer,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.05);
-- The claim walks this per webhook, so a webhook with a long queue (a dead
-- endpoint) never makes the others' deliveries slower to find.
CREATE INDEX delivery_pending ON webhooks.delivery (webhook_id, due_at, seq) WHERE state = 'pending';
CREATE INDEX delivery_leased ON webhooks.delivery (lease_until) WHERE state = 'sending';
CREATE INDEX delivery_webhook ON webhooks.delivery (webhook_id, created_at);
CREATE INDEX delivery_created_at ON webhooks.delivery (created_at);
CREATE INDEX delivery_outbox ON webhooks.delivery (outbox_id);

-- The delivery log: one row per attempt.
CREATE TABLE webhooks.delivery_attempt (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id      uuid NOT NULL,
    attempt          integer NOT NULL,
    attempted_at     timestamptz NOT NULL,
    duration_ms      double precision NOT NULL,
    dispatcher       text NOT NULL,
    outcome          text NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'retrying')),
    request_method   text NOT NULL,
    request_url      text NOT NULL,
    request_headers  jsonb NOT NULL,
    status_code      integer,
    response_headers jsonb,
    response_body    text,
    error            text
);
CREATE INDEX delivery_attempt_delivery ON webhooks.delivery_attempt (delivery_id, attempt);
CREATE INDEX delivery_attempt_at ON webhooks.delivery_attempt (attempted_at);

-- Every create, edit and delete of a webhook, secret redacted.
CREATE TABLE webhooks.changelog (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    changed_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    db_user        text NOT NULL,
    username       text,
    action         text NOT NULL CHECK (action IN ('create', 'update', 'delete')),
    webhook_id     bigint NOT NULL,
    webhook_name   text NOT NULL,
    before         jsonb,
    after          jsonb,
    secret_changed boolean NOT NULL
);
CREATE INDEX changelog_webhook ON webhooks.changelog (webhook_id, id);

-- Running dispatchers: heartbeat for `status`, and the idle flag that tells
-- the capture triggers whether a NOTIFY is needed.
CREATE TABLE webhooks.dispatcher (
    id         text PRIMARY KEY,
    host       text NOT NULL,
    pid        integer NOT NULL,
    version    text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    idle       boolean NOT NULL DEFAULT false
);

------------------------------------------------------------------------------
-- Capture
------------------------------------------------------------------------------

-- The capture functions below inline two things on purpose (a helper function
-- with its own SET clause costs as much as the outbox INSERT itself):
--  * the acting user: the SET ROLE role if any, else the login role
--    (current_user is the definer inside SECURITY DEFINER functions);
--  * the wake-up: NOTIFY takes a cluster-wide lock at commit that serialises
--    committing transactions, so it is only sent while a live dispatcher has
--    said it is idle; busy dispatchers find new rows on their own. The payload
--    is constant, so several in one transaction collapse into one.

-- Statement-level triggers with transition tables: one INSERT ... SELECT per
-- statement, which costs half as much per row as row-level triggers on
-- multi-row statements. TG_ARGV: the object type, then the primary key
-- columns (none for a table without a key).
--
-- UPDATE pairs each old row with its new row by position: PostgreSQL appends
-- the old and the new version of each updated row to the two transition
-- tables together (AfterTriggerSaveEvent), also for rows moved between
-- partitions, so the n-th rows belong together; a plain scan with
-- row_number() OVER () reads them in that order. Updates that change nothing
-- (same JSON text before and after) are skipped.
CREATE FUNCTION webhooks.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    n bigint;
    ts timestamptz := clock_timestamp();
    who text := CASE WHEN current_setting('role') = 'none' THEN session_user::text
                     ELSE current_setting('role') END;
    uname text := nullif(current_setting('danbyte.username', true), '');
    rid text := nullif(current_setting('danbyte.request_id', true), '');
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO webhooks.outbox
            (event, object_type, object_id, prechange, postchange, changed_at, db_user, username, request_id)
        SELECT 'create', TG_ARGV[0],
               CASE TG_NARGS WHEN 1 THEN NULL
                             WHEN 2 THEN r -> TG_ARGV[1]
                             ELSE (SELECT json_object_agg(k, r -> k) FROM unnest(TG_ARGV[1:]) k) END,
               NULL, r, ts, who, uname, rid
          FROM (SELECT to_json(t) AS r FROM danbyte_new t) s;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO webhooks.outbox
            (event, object_type, object_id, prechange, postchange, changed_at, db_user, username, request_id)
        SELECT 'update', TG_ARGV[0],
               CASE TG_NARGS WHEN 1 THEN NULL
                             WHEN 2 THEN a.r -> TG_ARGV[1]
                             ELSE (SELECT json_object_agg(k, a.r -> k) FROM unnest(TG_ARGV[1:]) k) END,
               b.r, a.r, ts, who, uname, rid
          FROM (SELECT row_number() OVER () AS i, to_json(t) AS r FROM danbyte_old t) b
          JOIN (SELECT row_number() OVER () AS i, to_json(t) AS r FROM danbyte_new t) a
            ON a.i = b.i
         WHERE a.r::text <> b.r::text;
    ELSE
        INSERT INTO webhooks.outbox
            (event, object_type, object_id, prechange, postchange, changed_at, db_user, username, request_id)
        SELECT 'delete', TG_ARGV[0],
               CASE TG_NARGS WHEN 1 THEN NULL
                             WHEN 2 THEN r -> TG_ARGV[1]
                             ELSE (SELECT json_object_agg(k, r -> k) FROM unnest(TG_ARGV[1:]) k) END,
               r, NULL, ts, who, uname, rid
          FROM (SELECT to_json(t) AS r FROM danbyte_old t) s;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 AND EXISTS (SELECT FROM webhooks.dispatcher d
                          WHERE d.idle AND d.seen_at > now() - interval '1 minute') THEN
        PERFORM pg_notify('danbyte_webhooks', '');
    END IF;
    RETURN NULL;
END
$fn$;

-- Trigger arguments are stored NUL-separated in pg_trigger.tgargs.
CREATE FUNCTION webhooks.trigger_args(args bytea) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    result text[] := '{}';
    pos int;
BEGIN
    LOOP
        pos := position('\x00'::bytea IN args);
        EXIT WHEN pos = 0;
        result := result || convert_from(substring(args FROM 1 FOR pos - 1),
                                          current_setting('server_encoding'));
        args := substring(args FROM pos + 1);
    END LOOP;
    RETURN result;
END
$fn$;

CREATE VIEW webhooks.watched AS
SELECT t.tgrelid::regclass AS table_name,
       (webhooks.trigger_args(t.tgargs))[1] AS object_type,
       (webhooks.trigger_args(t.tgargs))[2:] AS primary_key
  FROM pg_catalog.pg_trigger t
 WHERE t.tgname = 'danbyte_webhooks_insert' AND NOT t.tgisinternal;
COMMENT ON VIEW webhooks.watched IS 'Tables whose changes are captured, with their object type.';

-- watch() needs the rights to create triggers on the table (its owner, or a
-- role with the TRIGGER privilege), so it runs with the caller's rights.
CREATE FUNCTION webhooks.watch(tbl regclass, object_type text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    rel record;
    ot text;
    pk text[];
    wanted text[];
    current text[];
    args text;
BEGIN
    SELECT c.relkind, n.nspname, c.relname INTO rel
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = tbl;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table: only ordinary and partitioned tables can be watched', tbl;
    END IF;
    IF rel.nspname = 'webhooks' THEN
        RAISE EXCEPTION 'tables of the webhooks schema cannot be watched';
    END IF;
    ot := coalesce(object_type, rel.nspname || '.' || rel.relname);
    IF ot !~ '^\S+$' THEN
        RAISE EXCEPTION 'object type "%" must be a non-empty name without spaces, such as public.orders', ot;
    END IF;
    pk := ARRAY(SELECT a.attname::text
                  FROM pg_index i
                  CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = tbl AND i.indisprimary
                 ORDER BY k.ord);
    wanted := ARRAY[ot] || pk;
    SELECT webhooks.trigger_args(t.tgargs) INTO current
      FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'danbyte_webhooks_insert';
    IF current = wanted
       AND (SELECT count(*) FROM pg_trigger t
             WHERE t.tgrelid = tbl AND t.tgname LIKE 'danbyte\_webhooks\_%') = 3 THEN
        RETURN ot;  -- already watched with the same settings
    END IF;
    PERFORM webhooks.unwatch(tbl);
    args := array_to_string(ARRAY(SELECT quote_literal(a) FROM unnest(wanted) a), ', ');
    EXECUTE format('CREATE TRIGGER danbyte_webhooks_insert AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS danbyte_new FOR EACH STATEMENT '
                   'EXECUTE FUNCTION webhooks.capture(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER danbyte_webhooks_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS danbyte_old NEW TABLE AS danbyte_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION webhooks.capture(%s)', tbl, args);
    EXECUTE format('CREATE TRIGGER danbyte_webhooks_delete AFTER DELETE ON %s '
                   'REFERENCING OLD TABLE AS danbyte_old FOR EACH STATEMENT '
                   'EXECUTE FUNCTION webhooks.capture(%s)', tbl, args);
    RETURN ot;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'not allowed to watch %: run watch() as the owner of the table or a role with the TRIGGER privilege on it', tbl
        USING ERRCODE = 'insufficient_privilege';
END
$fn$;

CREATE FUNCTION webhooks.unwatch(tbl regclass) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    trg text;
    found_any boolean := false;
BEGIN
    FOR trg IN SELECT t.tgname FROM pg_trigger t
                WHERE t.tgrelid = tbl AND t.tgname LIKE 'danbyte\_webhooks\_%' AND NOT t.tgisinternal
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trg, tbl);
        found_any := true;
    END LOOP;
    RETURN found_any;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'not allowed to unwatch %: run unwatch() as the owner of the table', tbl
        USING ERRCODE = 'insufficient_privilege';
END
$fn$;

------------------------------------------------------------------------------
-- Webhook bookkeeping: timestamps, change log, cancelling unsent deliveries
------------------------------------------------------------------------------

CREATE FUNCTION webhooks.redact(w webhooks.webhook) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT (to_jsonb(w) - 'secret') || jsonb_build_object('secret_set', w.secret IS NOT NULL)
$fn$;

CREATE FUNCTION webhooks.webhook_before_write() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
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

CREATE FUNCTION webhooks.webhook_after_write() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    before jsonb;
    after jsonb;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        before := webhooks.redact(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        after := webhooks.redact(NEW);
    END IF;
    IF TG_OP = 'UPDATE' AND (before - 'updated_at') = (after - 'updated_at')
       AND OLD.secret IS NOT DISTINCT FROM NEW.secret THEN
        RETURN NULL;  -- nothing changed
    END IF;
    INSERT INTO webhooks.changelog
        (db_user, username, action, webhook_id, webhook_name, before, after, secret_changed)
    VALUES (CASE WHEN current_setting('role') = 'none' THEN session_user::text
                 ELSE current_setting('role') END,
            nullif(current_setting('danbyte.username', true), ''),
            CASE TG_OP WHEN 'INSERT' THEN 'create' WHEN 'UPDATE' THEN 'update' ELSE 'delete' END,
            coalesce(NEW.id, OLD.id), coalesce(NEW.name, OLD.name), before, after,
            CASE TG_OP WHEN 'UPDATE' THEN OLD.secret IS DISTINCT FROM NEW.secret
                       WHEN 'INSERT' THEN NEW.secret IS NOT NULL
                       ELSE OLD.secret IS NOT NULL END);
    -- A disabled or deleted webhook sends nothing more that was not sent yet.
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.enabled AND NOT NEW.enabled) THEN
        UPDATE webhooks.delivery
           SET state = 'cancelled', finished_at = now(),
               error = CASE TG_OP WHEN 'DELETE' THEN 'webhook deleted' ELSE 'webhook disabled' END
         WHERE webhook_id = OLD.id AND state = 'pending' AND NOT is_test;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER webhook_before_write BEFORE INSERT OR UPDATE ON webhooks.webhook
    FOR EACH ROW EXECUTE FUNCTION webhooks.webhook_before_write();
CREATE TRIGGER webhook_after_write AFTER INSERT OR UPDATE OR DELETE ON webhooks.webhook
    FOR EACH ROW EXECUTE FUNCTION webhooks.webhook_after_write();

------------------------------------------------------------------------------
-- Views and functions for people
------------------------------------------------------------------------------

-- The webhook list: everything but the secret, which shows only as set or not.
CREATE VIEW webhooks.webhook_list AS
SELECT w.id, w.name, w.enabled, w.object_types, w.triggers, w.method, w.payload_url,
       w.content_type, w.secret IS NOT NULL AS secret_set, w.additional_headers,
       w.verify_tls, w.timeout_seconds, w.max_attempts, w.retry_on_4xx, w.disabled_reason,
       w.created_at, w.updated_at,
       last.state AS last_delivery_state, last.status_code AS last_status_code,
       last.finished_at AS last_delivery_at
  FROM webhooks.webhook w
  LEFT JOIN LATERAL (
        SELECT d.state, d.status_code, d.finished_at
          FROM webhooks.delivery d
         WHERE d.webhook_id = w.id AND d.state IN ('succeeded', 'failed')
         ORDER BY d.created_at DESC
         LIMIT 1) last ON true;

-- Queue a test delivery for the running dispatcher; returns the delivery id.
-- The outcome appears in webhooks.delivery_log.
CREATE FUNCTION webhooks.send_test(name text) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    wid bigint;
    did uuid;
BEGIN
    SELECT w.id INTO wid FROM webhooks.webhook w WHERE w.name = send_test.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no webhook named "%"', send_test.name USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO webhooks.delivery (webhook_id, webhook_name, event, object_type, is_test)
    VALUES (wid, send_test.name, 'test', 'danbyte.test', true)
    RETURNING id INTO did;
    PERFORM pg_notify('danbyte_webhooks', '');
    RETURN did;
END
$fn$;

-- Resend a finished delivery with the same delivery id; returns false if it
-- is pending or being sent already. A disabled webhook sends nothing, so
-- redelivering to one is refused rather than left waiting forever.
CREATE FUNCTION webhooks.redeliver(delivery_id uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    d record;
    w record;
BEGIN
    SELECT * INTO d FROM webhooks.delivery WHERE id = redeliver.delivery_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no delivery with id %', redeliver.delivery_id USING ERRCODE = 'no_data_found';
    END IF;
    IF d.state IN ('pending', 'sending') THEN
        RETURN false;
    END IF;
    SELECT * INTO w FROM webhooks.webhook WHERE id = d.webhook_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'delivery % cannot be redelivered: its webhook was deleted', d.id
            USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT w.enabled AND NOT d.is_test THEN
        RAISE EXCEPTION 'delivery % cannot be redelivered: webhook "%" is disabled (enable it first)',
            d.id, w.name USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE webhooks.delivery
       SET state = 'pending', due_at = now(), finished_at = NULL,
           max_attempts = d.attempts + w.max_attempts
     WHERE id = d.id;
    PERFORM pg_notify('danbyte_webhooks', '');
    RETURN true;
END
$fn$;

-- The delivery log: one row per attempt, joined with its delivery.
CREATE VIEW webhooks.delivery_log AS
SELECT a.delivery_id, d.webhook_id, d.webhook_name, d.event, d.object_type, d.object_id,
       d.is_test, a.attempt, a.attempted_at, a.outcome, a.request_method, a.request_url,
       a.request_headers, a.status_code, a.response_headers, a.response_body, a.error,
       a.duration_ms, a.dispatcher, d.state AS delivery_state
  FROM webhooks.delivery_attempt a
  JOIN webhooks.delivery d ON d.id = a.delivery_id;

------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------

REVOKE ALL ON ALL TABLES IN SCHEMA webhooks FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA webhooks FROM PUBLIC;

GRANT USAGE ON SCHEMA webhooks TO danbyte_integrations, danbyte_dispatcher;
-- The CHECK constraints call these as the writing role.
GRANT EXECUTE ON FUNCTION webhooks.check_triggers(text[]), webhooks.check_object_types(text[]),
                          webhooks.check_method(text), webhooks.check_url(text),
                          webhooks.check_content_type(text), webhooks.check_headers(text)
    TO danbyte_integrations, danbyte_dispatcher;

-- Integrations: manage webhooks (the secret is write-only), read the logs.
GRANT SELECT (id, name, enabled, object_types, triggers, method, payload_url, content_type,
              additional_headers, verify_tls, timeout_seconds, max_attempts, retry_on_4xx,
              disabled_reason, enabled_at, created_at, updated_at)
    ON webhooks.webhook TO danbyte_integrations;
GRANT INSERT (name, enabled, object_types, triggers, method, payload_url, content_type, secret,
              additional_headers, verify_tls, timeout_seconds, max_attempts, retry_on_4xx)
    ON webhooks.webhook TO danbyte_integrations;
GRANT UPDATE (name, enabled, object_types, triggers, method, payload_url, content_type, secret,
              additional_headers, verify_tls, timeout_seconds, max_attempts, retry_on_4xx)
    ON webhooks.webhook TO danbyte_integrations;
GRANT DELETE ON webhooks.webhook TO danbyte_integrations;
GRANT SELECT ON webhooks.webhook_list, webhooks.watched, webhooks.changelog,
                webhooks.delivery_log, webhooks.delivery, webhooks.delivery_attempt,
                webhooks.dispatcher, webhooks.schema_version
    TO danbyte_integrations;
GRANT EXECUTE ON FUNCTION webhooks.send_test(text), webhooks.redeliver(uuid)
    TO danbyte_integrations;

-- Dispatcher: read webhooks (with secrets), work the queue, write the log.
GRANT SELECT ON webhooks.webhook, webhooks.outbox, webhooks.delivery, webhooks.delivery_attempt,
                webhooks.dispatcher, webhooks.schema_version, webhooks.webhook_list,
                webhooks.delivery_log, webhooks.watched, webhooks.changelog
    TO danbyte_dispatcher;
GRANT UPDATE (dispatched_at) ON webhooks.outbox TO danbyte_dispatcher;
GRANT INSERT, UPDATE, DELETE ON webhooks.delivery, webhooks.dispatcher TO danbyte_dispatcher;
GRANT INSERT, DELETE ON webhooks.delivery_attempt TO danbyte_dispatcher;
GRANT DELETE ON webhooks.outbox TO danbyte_dispatcher;
-- 410 Gone disables the webhook with a recorded reason.
GRANT UPDATE (enabled, disabled_reason) ON webhooks.webhook TO danbyte_dispatcher;
GRANT EXECUTE ON FUNCTION webhooks.send_test(text), webhooks.redeliver(uuid)
    TO danbyte_dispatcher;

INSERT INTO webhooks.schema_version (version, name) VALUES ('001', 'init');
END
$migration$;

COMMIT;
