-- Danbyte Webhooks, migration 002: redelivery in bulk, health views.
-- Apply after 001_init.sql, the same way (psql or `danbyte-webhooks migrate`).

BEGIN;

SELECT pg_advisory_xact_lock(727364591);

DO $migration$
BEGIN
IF to_regclass('webhooks.schema_version') IS NULL
   OR NOT EXISTS (SELECT FROM webhooks.schema_version WHERE version = '001') THEN
    RAISE EXCEPTION 'danbyte-webhooks: apply 001_init.sql before 002_operations.sql';
END IF;
IF EXISTS (SELECT FROM webhooks.schema_version WHERE version = '002') THEN
    RAISE NOTICE 'danbyte-webhooks: migration 002 is already applied, nothing to do';
    RETURN;
END IF;

-- Redeliver every delivery of a webhook (NULL: of every enabled webhook) in
-- a final state that finished within `since`; returns how many were queued.
CREATE FUNCTION webhooks.redeliver(webhook_name text, state text DEFAULT 'failed',
                                   since interval DEFAULT interval '1 day')
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    n integer;
BEGIN
    IF state NOT IN ('failed', 'succeeded', 'cancelled') THEN
        RAISE EXCEPTION 'state must be failed, succeeded or cancelled, not "%"', state
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF redeliver.webhook_name IS NOT NULL
       AND NOT EXISTS (SELECT FROM webhooks.webhook w WHERE w.name = redeliver.webhook_name) THEN
        RAISE EXCEPTION 'no webhook named "%"', redeliver.webhook_name USING ERRCODE = 'no_data_found';
    END IF;
    WITH chosen AS (
        SELECT d.id, d.attempts, w.max_attempts
          FROM webhooks.delivery d
          JOIN webhooks.webhook w ON w.id = d.webhook_id
         WHERE (redeliver.webhook_name IS NULL OR w.name = redeliver.webhook_name)
           AND w.enabled AND NOT d.is_test
           AND d.state = redeliver.state
           AND d.finished_at >= now() - since
           FOR UPDATE OF d
    )
    UPDATE webhooks.delivery d
       SET state = 'pending', due_at = now(), finished_at = NULL,
           max_attempts = chosen.attempts + chosen.max_attempts
      FROM chosen WHERE d.id = chosen.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('danbyte_webhooks', '');
    END IF;
    RETURN n;
END
$fn$;

-- Retention deletes finished deliveries by age.
CREATE INDEX delivery_finished_at ON webhooks.delivery (finished_at) WHERE finished_at IS NOT NULL;

-- One row: is the dispatcher keeping up? For dashboards and health checks.
CREATE VIEW webhooks.status AS
SELECT (SELECT max(version) FROM webhooks.schema_version) AS schema_version,
       (SELECT count(*) FROM webhooks.dispatcher
         WHERE seen_at > now() - interval '1 minute') AS dispatchers_alive,
       (SELECT max(seen_at) FROM webhooks.dispatcher) AS last_dispatcher_seen_at,
       (SELECT count(*) FROM webhooks.outbox WHERE dispatched_at IS NULL) AS outbox_backlog,
       (SELECT count(*) FROM webhooks.delivery
         WHERE state = 'pending' AND due_at <= now()) AS deliveries_due,
       (SELECT count(*) FROM webhooks.delivery WHERE state = 'sending') AS deliveries_in_flight,
       (SELECT count(*) FROM webhooks.delivery
         WHERE state = 'pending' AND due_at > now()) AS retries_scheduled,
       least((SELECT o.changed_at FROM webhooks.outbox o
               WHERE o.dispatched_at IS NULL ORDER BY o.id LIMIT 1),
             (SELECT min(d.due_at) FROM webhooks.delivery d
               WHERE d.state = 'pending' AND d.due_at <= now())) AS oldest_undelivered_at,
       extract(epoch FROM now() - least(
           (SELECT o.changed_at FROM webhooks.outbox o
             WHERE o.dispatched_at IS NULL ORDER BY o.id LIMIT 1),
           (SELECT min(d.due_at) FROM webhooks.delivery d
             WHERE d.state = 'pending' AND d.due_at <= now())))::double precision
           AS oldest_undelivered_age_seconds;

-- Per webhook: the last hour's outcomes, what is still to send, the last error.
CREATE VIEW webhooks.webhook_stats AS
SELECT w.id AS webhook_id, w.name, w.enabled, w.disabled_reason,
       count(d.id) FILTER (WHERE d.state = 'succeeded') AS succeeded_last_hour,
       count(d.id) FILTER (WHERE d.state = 'failed') AS failed_last_hour,
       count(d.id) FILTER (WHERE d.state IN ('pending', 'sending')) AS pending,
       last_failure.error AS last_error,
       last_failure.finished_at AS last_error_at
  FROM webhooks.webhook w
  LEFT JOIN webhooks.delivery d
         ON d.webhook_id = w.id
        AND (d.created_at > now() - interval '1 hour' OR d.state IN ('pending', 'sending'))
  LEFT JOIN LATERAL (
        SELECT f.error, f.finished_at FROM webhooks.delivery f
         WHERE f.webhook_id = w.id AND f.state = 'failed'
         ORDER BY f.finished_at DESC LIMIT 1) last_failure ON true
 GROUP BY w.id, last_failure.error, last_failure.finished_at;

REVOKE ALL ON webhooks.status, webhooks.webhook_stats FROM PUBLIC;
REVOKE ALL ON FUNCTION webhooks.redeliver(text, text, interval) FROM PUBLIC;
GRANT SELECT ON webhooks.status, webhooks.webhook_stats TO danbyte_integrations, danbyte_dispatcher;
GRANT EXECUTE ON FUNCTION webhooks.redeliver(text, text, interval)
    TO danbyte_integrations, danbyte_dispatcher;

INSERT INTO webhooks.schema_version (version, name) VALUES ('002', 'operations');
END
$migration$;

COMMIT;
