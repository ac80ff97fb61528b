"""``tome``: Token Merging, one module per framework family.

- :mod:`.vit`: ToMe (Bolya et al., 2023) on timm ViTs and open_clip visual towers, between each block's
  attention and its MLP;
- :mod:`.diffusers`: ToMe for Stable Diffusion (Bolya and Hoffman, 2023) on diffusers UNets and DiTs;
- here: the :class:`Tome` method, its options (each declared for the frameworks that read it) and checks.
"""

from __future__ import annotations

from typing import Any

from ...errors import OptionError
from ...frameworks import Target
from ...frameworks.base import vit_blocks
from ...options import Option, bool_option
from ...patching import Handle, Patcher
from ...registry import Method, register
from . import diffusers, vit
from .vit import TomeHandle, TomeStep

__all__ = ["Tome", "TomeHandle", "TomeStep"]


def _check_r(v: Any) -> int | tuple[int, float] | list[int]:
    def is_r(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if is_r(v):
        return v
    if isinstance(v, tuple) and len(v) == 2 and is_r(v[0]) and isinstance(v[1], (int, float)) \
            and not isinstance(v[1], bool) and -1 <= v[1] <= 1:
        return (v[0], float(v[1]))
    if isinstance(v, list) and all(is_r(x) for x in v):
        return list(v)
    raise ValueError


@register
class Tome(Method):
    name = "tome"
    summary = "merge similar tokens between attention and MLP (bipartite soft matching, proportional attention)"
    paper = "Bolya et al., 2023, 'Token Merging: Your ViT But Faster' (ICLR 2023)"
    frameworks = ("timm", "open_clip", "diffusers")
    families = {"timm": ("VisionTransformer", "VisionTransformerDistilled", "Eva", "Beit", "NaFlexVit"),
                "open_clip": ("VisionTransformer",),
                "diffusers": diffusers.FAMILIES}
    options = tuple(o.scoped(frameworks=("timm", "open_clip")) for o in (
        Option("r", 8, "an int >= 0, an (r, inflect) pair with inflect in [-1, 1], or a list of ints >= 0",
               _check_r, identity=0, doc="tokens removed per layer (clamped to half the image tokens)"),
        bool_option("prop_attn", True, doc="proportional attention: add log(token size) to attention logits"),
        bool_option("trace_source", False, doc="record which patches each token holds (handle.source)"),
    )) + diffusers.OPTIONS  # diffusers UNets and DiTs: ToMe for Stable Diffusion (tome.diffusers); strict: all three

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        if target.framework == "diffusers":
            super().check_target(target, options)
            return diffusers.check(target, options)
        super().check_target(target, options)
        depth = len(vit_blocks(target))
        if isinstance(options["r"], list) and len(options["r"]) > depth:
            raise OptionError(f"tome: r lists {len(options['r'])} layers but this {target.family} has {depth} blocks")

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> Handle:
        if target.framework == "diffusers":
            return diffusers.install(target, patcher, options)
        return vit.install(target, patcher, options)
