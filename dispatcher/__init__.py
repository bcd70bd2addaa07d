"""Danbyte Webhooks: a PostgreSQL-native webhook dispatcher.

Receivers verify deliveries with :func:`verify_signature`.
"""

__version__ = "0.1.0"

from dispatcher.delivery import sign, verify_signature

__all__ = ["__version__", "sign", "verify_signature"]
