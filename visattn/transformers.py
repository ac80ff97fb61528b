"""transformers entry points: the attention implementations visattn registers in ``AttentionInterface``.

Importing this module (``import visattn`` does when transformers is imported already) registers:

- ``"visattn_sdpa"`` and ``"visattn_eager"``: SDPA and eager attention that run the routes ``visattn.apply``
  installs (:mod:`visattn.frameworks.transformers`); without routes they are the stock functions, so
  ``model.set_attn_implementation("visattn_sdpa")`` changes no output.
- ``"visattn_visual_sink"`` and ``"visattn_head_modulation"``: names that
  ``model.set_attn_implementation`` accepts, whose first forward raises
  :class:`~visattn.errors.UnsupportedModelError` naming ``visattn.apply``: both methods need hooks beyond
  the attention function (the decoder layers' hidden states and the prompt's image positions, read before
  each forward), which an attention implementation cannot install. ``visattn.apply(model, "visual_sink")``
  installs them and ``visattn.remove(model)`` undoes them exactly.
"""

from __future__ import annotations

from .frameworks.transformers import refuse_implementation

_NEEDS = "forward hooks on the model (the prompt's image positions) and on its decoder layers"
refuse_implementation("visual_sink", _NEEDS + " (each layer's hidden states, where the visual sinks are found)")
refuse_implementation("head_modulation", _NEEDS + " (and, for vhr, an image-ablated pass)")

__all__: list[str] = []
