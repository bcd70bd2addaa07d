-- Runs once, when the compose stack's database is first created: the demo
-- application table that the `setup` service watches.
CREATE TABLE IF NOT EXISTS public.orders (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer text NOT NULL,
    total    numeric(10, 2) NOT NULL,
    status   text NOT NULL DEFAULT 'new'
);
