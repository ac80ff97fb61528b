"""One module per method, or a package with one module per framework family (tome, prune) or concern
(sparse_video); importing this package registers them all."""

from . import bra, head_modulation, inspect, isolation, prune, sparse_video, tome, visual_sink  # noqa: F401
