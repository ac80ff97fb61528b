"""``isolation``: IR-Diffusion's isolation and reposition attention (Improving Multi-Subject Consistency in
Open-Domain Image Generation with Isolation and Reposition Attention), for the SDXL UNet (and other
``UNet2DConditionModel``s) and Flux.

Reference images and a target are generated in one batch: the batch is made of groups of
``references + 1`` samples, the references first and the target last (a classifier-free-guidance
batch is two such groups). Every self-attention layer (UNet ``attn1``, Flux ``attn`` in dual- and
single-stream blocks) then attends as follows (:mod:`visattn.core.regions` builds the masks at the
layer's token grid):

- references attend as in the stock model (their own tokens only);
- isolation attention: in the target, the image tokens of subject ``i`` do not attend to those of a
  subject ``j != i`` (``-inf`` logits); text and background tokens are unchanged;
- the target's subject ``i`` also attends to its reference subject's keys and values, taken from the
  reference sample of the same batch (shared k/v, as in ConsiStory and StoryDiffusion); subject ``i``
  comes from reference ``i`` (``references`` equal to the number of subjects) or from the one
  reference (``references=1``);
- reposition attention: the reference subject is scaled and moved onto the target box before its
  keys are shared: target token ``p`` of subject ``i`` gets the reference token at the corresponding
  point of the reference box (nearest token, inside the reference region). Our interpretation of the
  paper's "scaling and repositioning subjects ... to the same position": the reference image itself is
  generated unchanged, and its subject's tokens are repositioned where they are shared. On Flux,
  whose keys carry rotary positions, a repositioned token is rotated for its new position, so
  corresponding tokens line up in position as well as in content.

Regions are given in pixels: boxes ``(x0, y0, x1, y1)`` or masks (PIL images, 2-D arrays or tensors of
the image size); the image size is ``image_size``, else that of the masks, else the latent size
times 8 (UNet) or the token grid times 16 (Flux, packed latents).

Options and identity values: ``target_regions`` and ``reference_regions`` (one per subject, in the
same order; identity: none, ``()``, and the model is unchanged bit for bit), ``references`` (1),
``reposition`` (True), ``image_size`` (None).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.regions import as_region, check_in_image, isolation_mask, reposition, subject_map
from ..errors import OptionError, ShapeError, UnsupportedModelError
from ..frameworks import Target
from ..frameworks.base import PerThread, adapter, memo
from ..frameworks.diffusers_layers import LayerProcessor, StockLayer
from ..options import Option, bool_option, int_option, validate_options
from ..patching import Handle, Patcher
from ..registry import Method, register

PIXELS_PER_TOKEN = {"UNet2DConditionModel": 8, "FluxTransformer2DModel": 16}


def _check_regions(v: Any) -> tuple:
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise TypeError
    return tuple(v)


def _check_size(v: Any) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        return (v[0], v[1])
    raise ValueError


_REGIONS = "a list of subject regions, each a box (x0, y0, x1, y1) in pixels or a mask (PIL image, 2-D array or tensor)"


class _Plan:
    """The subjects, and per token grid the target's subject map, the shared reference tokens and the mask."""

    def __init__(self, model: nn.Module, family: str, options: dict[str, Any]) -> None:
        from ..frameworks.diffusers import layer_grids

        self.layer_grids = layer_grids(model)
        self.family = family
        self.targets = [as_region(r) for r in options["target_regions"]]
        self.refs = [as_region(r) for r in options["reference_regions"]]
        self.references: int = options["references"]
        self.reposition: bool = options["reposition"]
        self.image_size: tuple[int, int] | None = options["image_size"] or next(
            (r.size for r in self.targets + self.refs if r.size is not None), None)
        self.grids: PerThread[tuple[int, int]] = PerThread(lambda: (0, 0))  # the running call's latent grid
        self._masks: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    @property
    def group(self) -> int:
        return self.references + 1

    def check(self, image_size: tuple[int, int]) -> None:
        for what, regions in (("target region", self.targets), ("reference region", self.refs)):
            for i, region in enumerate(regions):
                check_in_image(region, image_size, f"isolation: {what} {i}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.grids.get()

    def start(self, grid: tuple[int, int]) -> None:
        self.grids.set(grid)
        if self.image_size is None:
            scale = PIXELS_PER_TOKEN[self.family]
            self.image_size = (grid[0] * scale, grid[1] * scale)
            self.check(self.image_size)

    def layer_grid(self, layer: int) -> tuple[int, int]:
        return self.layer_grids[layer].grid(self.grid)

    def layout(self, grid: tuple[int, int], text_tokens: int, device: torch.device
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(reference sample per extra key, its source token, its place, mask [S, S + M])`` at ``grid``."""
        def build() -> tuple[Tensor, Tensor, Tensor, Tensor]:
            size = self.image_size
            sample, source, place, owner = [], [], [], []
            for i, (ref, tgt) in enumerate(zip(self.refs, self.targets)):
                src, plc = reposition(ref, tgt, size, grid, self.reposition)
                sample.append(torch.full_like(src, i if self.references > 1 else 0))
                source.append(src)
                place.append(plc)
                owner.append(torch.full_like(src, i))
            mask = isolation_mask(subject_map(self.targets, size, grid), torch.cat(owner), text_tokens)
            return tuple(t.to(device) for t in (torch.cat(sample), torch.cat(source), torch.cat(place), mask))

        return memo(self._masks, (grid, text_tokens, device), build)

    def split(self, batch: int) -> int:
        if batch % self.group:
            raise ShapeError(f"isolation: a batch of {batch} is not made of groups of {self.group} "
                             f"({self.references} reference images, then the target)")
        return batch // self.group


def _attend(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, extra_k: Tensor, extra_v: Tensor, mask: Tensor) -> Tensor:
    """Attention of a batch of groups ``[G * (R + 1), H, S, D]``: references as stock, each target over its
    own tokens and ``extra_k``/``extra_v`` ``[G, H, M, D]`` under ``mask`` ``[S, S + M]``."""
    groups, size = q.shape[0] // plan.group, plan.group
    q, k, v = (t.unflatten(0, (groups, size)) for t in (q, k, v))
    refs = F.scaled_dot_product_attention(*(t[:, :-1].flatten(0, 1) for t in (q, k, v)))
    target = F.scaled_dot_product_attention(q[:, -1], torch.cat([k[:, -1], extra_k], dim=2),
                                            torch.cat([v[:, -1], extra_v], dim=2), attn_mask=mask)
    return torch.cat([refs.unflatten(0, (groups, size - 1)), target[:, None]], dim=1).flatten(0, 1)


def _shared(t: Tensor, group: int, sample: Tensor, source: Tensor) -> Tensor:
    """Tokens ``source`` of reference ``sample`` in every group: ``[G * group, H, S, D] -> [G, H, M, D]``."""
    return t.unflatten(0, (-1, group))[:, sample, :, source].permute(1, 2, 0, 3)


def _unet_attention(plan: _Plan, layer: int, stock: Any, attn: nn.Module, hidden_states: Tensor,
                    encoder_hidden_states: Tensor | None = None, attention_mask: Tensor | None = None,
                    temb: Tensor | None = None, **kwargs: Any) -> Tensor:
    """Self-attention of a UNet ``Attention`` (``AttnProcessor2_0``'s steps) with isolation and reposition;
    with no subjects, the ``stock`` processor it replaces."""
    if not plan.targets or encoder_hidden_states is not None or attention_mask is not None:
        return stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
    plan.split(hidden_states.shape[0])
    heads = attn.heads
    q, k, v = (proj(hidden_states).unflatten(-1, (heads, -1)).transpose(1, 2)
               for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    sample, source, _, mask = plan.layout(plan.layer_grid(layer), 0, q.device)
    out = _attend(plan, q, k, v, _shared(k, plan.group, sample, source), _shared(v, plan.group, sample, source),
                  mask)
    out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2).to(q.dtype)))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


def _flux_attention(plan: _Plan, layer: int, stock: Any, attn: nn.Module, hidden_states: Tensor,
                    encoder_hidden_states: Tensor | None = None, attention_mask: Tensor | None = None,
                    image_rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``FluxAttnProcessor``'s steps with isolation and reposition (reference keys rotated for the positions
    they are moved to); with no subjects, the ``stock`` processor it replaces."""
    if not plan.targets or attention_mask is not None:
        return stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
    from diffusers.models.embeddings import apply_rotary_emb

    from ..frameworks.diffusers import flux_joint_output, flux_joint_qkv

    plan.split(hidden_states.shape[0])
    q, k, v = flux_joint_qkv(attn, hidden_states, encoder_hidden_states)
    grid = plan.grid
    text = q.shape[1] - grid[0] * grid[1]  # text first, then the image grid
    sample, source, place, mask = plan.layout(grid, text, q.device)
    q, k_pos, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    extra_k = _shared(k_pos, plan.group, sample, text + source)  # before rotation: rotated for its place
    extra_v = _shared(v, plan.group, sample, text + source)
    if image_rotary_emb is not None:
        cos, sin = image_rotary_emb
        q = apply_rotary_emb(q, image_rotary_emb)
        k_pos = apply_rotary_emb(k_pos, image_rotary_emb)
        extra_k = apply_rotary_emb(extra_k, (cos[text + place], sin[text + place]))
    out = _attend(plan, q, k_pos, v, extra_k, extra_v, mask).transpose(1, 2).flatten(2, 3).to(q.dtype)
    return flux_joint_output(attn, out, hidden_states, encoder_hidden_states)


class IsolationAttnProcessor(LayerProcessor):
    """``isolation`` (module doc) as a diffusers attention processor made for ``model`` (an SDXL-style UNet or
    Flux): ``model.set_attn_processor(p := IsolationAttnProcessor(model, target_regions=..., reference_regions=...))``
    runs every self-attention layer as ``visattn.apply(model, "isolation", ...)`` does (which installs this very
    processor); ``model.set_attn_processor(p.stock_processors)`` gives stock outputs again and ``p.detach()``
    removes the model hook that reads each call's latent grid. Options: those of ``isolation``."""

    method = "isolation"

    def __init__(self, model: nn.Module, *, patcher: Patcher | None = None, **options: Any) -> None:
        from ..frameworks import detect

        self.options = validate_options("isolation", Isolation.options, options)
        self._target = detect(model)
        Isolation().check_target(self._target, self.options)
        super().__init__(model, patcher)

    def setup(self) -> None:
        from ..frameworks.diffusers import call_grid, on_call

        model = self._model
        self.plan = _Plan(model, self._target.family, self.options)
        on_call(model, self._patcher, lambda inputs: self.plan.start(call_grid(model, inputs)[0]))
        index = {id(m): i for i, (_, m) in enumerate(adapter("diffusers").attention_layers(model))}
        self.layers = {index[id(m)] for _, m in _self_attention(model)}  # the layers this processor serves
        self._attend = _flux_attention if self._target.family == "FluxTransformer2DModel" else _unet_attention

    def run(self, layer: StockLayer, attn: nn.Module, hidden_states: Tensor, kwargs: dict[str, Any]) -> Any:
        if layer.index not in self.layers:
            return layer.stock(attn, hidden_states, **kwargs)
        return self._attend(self.plan, layer.index, layer.stock, attn, hidden_states, **kwargs)


class IsolationHandle(Handle):
    """Handle of ``isolation``: ``image_size`` is the image size the regions refer to (known after the
    first call if no mask or ``image_size`` gave it)."""

    def __init__(self, *args: Any, plan: _Plan, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plan = plan

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self._plan.image_size


@register
class Isolation(Method):
    name = "isolation"
    summary = "multi-subject consistency: isolate subjects in the target, share repositioned reference subjects"
    paper = ("IR-Diffusion: 'Improving Multi-Subject Consistency in Open-Domain Image Generation with "
             "Isolation and Reposition Attention'")
    frameworks = ("diffusers",)
    families = {"diffusers": tuple(PIXELS_PER_TOKEN)}
    composes_with = frozenset({"inspect"})
    options = (
        Option("target_regions", (), _REGIONS, _check_regions, identity=(),
               doc="each subject's region in the target image"),
        Option("reference_regions", (), _REGIONS, _check_regions, identity=(),
               doc="each subject's region in its reference image (same order)"),
        int_option("references", 1, low=1, doc="reference images per group (1, or one per subject), before the target"),
        bool_option("reposition", True, doc="scale and move each reference subject onto its target box"),
        Option("image_size", None, "None or (height, width) in pixels, positive ints", _check_size,
               doc="image size the regions refer to (None: the masks' size, else the generated size)"),
    )

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        super().check_target(target, options)
        subjects, refs = len(options["target_regions"]), len(options["reference_regions"])
        if subjects != refs:
            raise OptionError(f"isolation: {subjects} target regions but {refs} reference regions; give one of each "
                              f"per subject")
        if options["references"] > 1 and options["references"] != subjects:
            raise OptionError(f"isolation: references={options['references']} must be 1 (every subject from one "
                              f"reference image) or the number of subjects ({subjects})")
        try:
            plan = _Plan(target.model, target.family, options)
            if plan.image_size is not None:
                plan.check(plan.image_size)
        except ValueError as exc:
            raise OptionError(str(exc) if str(exc).startswith("isolation") else f"isolation: {exc}") from None
        for name, module in _self_attention(target.model):
            if getattr(module, "spatial_norm", None) is not None or getattr(module, "group_norm", None) is not None:
                raise UnsupportedModelError(f"isolation: attention layer {name} normalises its input itself "
                                            f"(spatial_norm or group_norm), which isolation does not reproduce")

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> IsolationHandle:
        from ..frameworks.diffusers import set_processors

        processor = IsolationAttnProcessor(target.model, patcher=patcher, **options)
        set_processors(target.model, patcher, lambda i, name, m: processor if i in processor.layers else None)
        return IsolationHandle(self.name, target.model, options, patcher, plan=processor.plan)


def _self_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from ..frameworks.diffusers import attention_layers

    return [(n, m) for n, m in attention_layers(model) if not getattr(m, "is_cross_attention", False)]
