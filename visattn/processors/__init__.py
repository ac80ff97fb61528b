"""One module per method; importing this package registers them all."""

from . import inspect  # noqa: F401
