"""The benchmark: ``python -m tests.bench [--quick] [--dsn DSN] [--json PATH]``."""
