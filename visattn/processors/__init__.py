"""One module per method; importing this package registers them all."""

from . import bra, head_modulation, inspect, isolation, prune, sparse_video, tome, visual_sink  # noqa: F401
