"""diffusers adapter of ``tome``: ToMe for Stable Diffusion (Bolya & Hoffman, 2023, "Token Merging for
Fast Stable Diffusion") on UNets, SDXL's included, image DiTs and video DiTs.

The math is :mod:`visattn.core.merge_sd`: one random destination per ``sy x sx`` cell of the image
grid, every source matched to its most similar destination (cosine similarity of the hidden
states), the ``r = ratio * N`` most similar sources averaged into their destination, and the
output copied back to every token afterwards. Text tokens are never merged: a UNet's and PixArt's
blocks see image tokens only, SD3's joint blocks keep the text in ``encoder_hidden_states``, and
Flux's single-stream attention gets its text first (the image tokens after it are merged).

Where the merge happens depends on the family:

- UNets, PixArt, DiT, SD3 and Flux (:data:`BLOCK_FAMILIES`) merge a layer's input hidden states, as tomesd does,
  with the two scopes below;
- the families on diffusers' attention dispatcher (:data:`CALL_FAMILIES`: Wan, WanVACE, SkyReels-V2, LTX,
  CogVideoX, HunyuanVideo (1.5), Mochi, Flux.2, Chroma, Qwen-Image, AuraFlow, CogView4, Lumina 2) merge at the
  attention call: each self-attention's stock processor runs (projections, norms, rotary embeddings exactly as
  stock) and its SDPA call gets the grid tokens' ``q``, ``k`` and ``v`` averaged in their groups (the metric: the
  keys averaged over heads); the attention runs on ``N - r`` grid tokens plus the text, and its output is
  unmerged before the output projection. As the projections are linear, this is the layer-input merge but for
  the per-token steps between them (q/k normalisation, the rotary embedding), which here act before the
  average. Only the attention gets cheaper (the projections and MLPs run on every token), which is where video
  DiTs spend their time. Video grids are cut into ``st x sy x sx`` cells (``st`` frames deep; ``st=1``: a
  destination in every frame). An attention mask is followed exactly where merged tokens share their mask rows
  and columns (a text mask); a mask that differs between grid tokens raises :class:`ShapeError` at the call.

Two scopes, both run by :class:`TomeAttnProcessor` (the stock processors keep running inside it; block scope
adds forward hooks on the blocks) and undone exactly by ``remove()``:

- ``scope="attention"`` (what tomesd does): the input of each self-attention (UNet and PixArt
  ``attn1``; SD3 ``attn`` and ``attn2``; Flux ``attn``) is merged, the attention runs on ``N - r``
  image tokens, and its output is unmerged: ``y_i = Attn(merge(x))_{G(i)}``.
- ``scope="block"``: the whole transformer block (self-attention, cross- or joint attention and MLP)
  runs on the merged tokens and only its residual update is unmerged, so each token keeps its own
  residual stream: ``y_i = x_i + (Block(merge(x)) - merge(x))_{G(i)}``.

Flux's rotary position tables are per token: a merged sequence takes, in every slot, the position
of the token that stands there (a destination or a kept source; ``CellMerge.select``), which
differs per sample, so merged Flux attention layers get :class:`PerSampleRopeFluxAttnProcessor`,
diffusers' Flux processor with per-sample tables (it defers to the stock processor otherwise).

Options and identity values: ``ratio`` (0.5; identity 0: nothing is merged and the output is
bit-identical to stock), ``st`` (1: the cell depth in frames, video families only), ``max_downsample`` (None: the
finest resolution that has self-attention,
tomesd's default of 1 on SD 1.x/2.x, 2 on SDXL, whose attention runs at 1/2 and 1/4 of the latent
size; 1, 2, 4 or 8: merge at every UNet level downsampled at most that much; DiTs have one level,
1), ``sx`` and ``sy`` (2: the cell size), ``seed`` (0: with the call's timestep, the key of the
destinations' pseudo-random positions: each denoising step gets fresh ones, as in tomesd, the layers of
one call at one resolution share them, and a generation run again gets the same; they are hashed on the
device, so compiled and CUDA-graph runs draw them too), ``scope``
("attention"; "block" on :data:`BLOCK_FAMILIES` only), ``strict`` (False: where the merge kernel cannot run, the
average goes through PyTorch's scatter-add, logged once; True: an error). ``tome`` declares these beside its
timm/open_clip options, each scoped to its frameworks: an option of the other frameworks, given, is an error
(:func:`visattn.options.check_scope`).

Where Triton runs, the decision and the merge are Triton kernels and torch ops
(:func:`visattn.kernels.tome.match_to_cells`: the decision in four launches, each group's average in one gather, a
merged block's update in one pass); elsewhere the PyTorch of :func:`visattn.core.merge_sd.match_to_cells`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...core.layout import TokenLayout
from ...core.merge_sd import CellMerge, cell_destinations
from ...errors import OptionError, ShapeError, UnsupportedModelError
from ...frameworks import Target
from ...frameworks.base import PerThread, SDPAIntercept, adapter, memo
from ...frameworks.diffusers_layers import LayerProcessor, StockLayer
from ...kernels.tome import match_to_cells
from ...options import Option, bool_option, choice_option, float_option, int_option, validate_options
from ...patching import Handle, Patcher

BLOCK_FAMILIES = ("UNet2DConditionModel", "PixArtTransformer2DModel", "DiTTransformer2DModel",
                  "SD3Transformer2DModel", "FluxTransformer2DModel")
CALL_FAMILIES = ("WanTransformer3DModel", "WanVACETransformer3DModel", "SkyReelsV2Transformer3DModel",
                 "LTXVideoTransformer3DModel", "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel",
                 "HunyuanVideo15Transformer3DModel", "MochiTransformer3DModel", "Flux2Transformer2DModel",
                 "ChromaTransformer2DModel", "QwenImageTransformer2DModel", "AuraFlowTransformer2DModel",
                 "CogView4Transformer2DModel", "Lumina2Transformer2DModel")
FAMILIES = BLOCK_FAMILIES + CALL_FAMILIES
# not SanaTransformer2DModel: its self-attention is linear attention (no attention call over tokens to shorten)
DOWNSAMPLES = (1, 2, 4, 8)


def _check_max_downsample(v: Any) -> int | None:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v in DOWNSAMPLES):
        return v
    raise ValueError


_DIFFUSERS = ("diffusers",)
OPTIONS = tuple(o.scoped(frameworks=_DIFFUSERS) for o in (
    float_option("ratio", 0.5, low=0.0, high=1.0, high_open=True, identity=0.0,
                 doc="diffusers: share of a layer's image tokens merged away (r = ratio * N)"),
    int_option("sx", 2, low=1, doc="diffusers: cell width, one destination per sy x sx cell"),
    int_option("sy", 2, low=1, doc="diffusers: cell height, one destination per sy x sx cell"),
    int_option("st", 1, low=1, doc="diffusers: cell depth in frames (video families), one destination per "
                                   "st x sy x sx cell"),
    int_option("seed", 0, low=0,
               doc="diffusers: with each call's timestep, the key of the destinations' positions in their cells"),
    choice_option("scope", "attention", ("attention", "block"),
                  doc="diffusers: merge around each self-attention, or around each whole transformer block"),
    Option("max_downsample", None, "None or one of 1, 2, 4, 8", _check_max_downsample,
           doc="diffusers: merge at UNet levels downsampled at most this much (None: the finest with attention)"),
)) + (bool_option("strict", False, doc="raise instead of falling back from the merge kernels to PyTorch").scoped(
    frameworks=("timm", "open_clip", "diffusers")),)


class _Site:
    """A transformer block the method patches: its kind, its self-attention layers and its level."""

    def __init__(self, name: str, block: nn.Module, kind: str, attentions: list[tuple[int, nn.Module]],
                 downsample: int) -> None:
        self.name = name
        self.block = block
        self.kind = kind  # "basic" (UNet, PixArt, DiT), "joint" (SD3), "flux", "flux_single", "call" (CALL_FAMILIES)
        self.attentions = attentions  # (index in attention_layers, module)
        self.downsample = downsample


def _sites(model: nn.Module) -> list[_Site]:
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from ...frameworks.diffusers import attention_layers, layer_grids, layer_kinds

    if type(model).__name__ in CALL_FAMILIES:  # every self-attention layer, merged at its attention call
        return [_Site(name, module, "call", [(i, module)], 1)
                for i, ((name, module), kind) in enumerate(zip(attention_layers(model), layer_kinds(model)))
                if kind == "self"]
    index = {id(m): i for i, (_, m) in enumerate(attention_layers(model))}
    kinds = ((BasicTransformerBlock, "basic", ("attn1",)), (JointTransformerBlock, "joint", ("attn", "attn2")),
             (FluxTransformerBlock, "flux", ("attn",)), (FluxSingleTransformerBlock, "flux_single", ("attn",)))
    probe = (1024, 1024)  # a grid divisible by every UNet level: the layout's grid gives the downsampling
    grids, sites = layer_grids(model), []
    for name, block in model.named_modules():
        for cls, kind, attrs in kinds:
            if type(block) is cls:
                attns = [(index[id(a)], a) for a in (getattr(block, x, None) for x in attrs)
                         if a is not None and not getattr(a, "is_cross_attention", False)]
                if attns:
                    grid = grids[attns[0][0]].grid(probe)
                    sites.append(_Site(name, block, kind, attns, probe[0] // grid[0]))
    return sites


def _selected(sites: list[_Site], max_downsample: int | None) -> list[_Site]:
    levels = sorted({s.downsample for s in sites})
    limit = levels[0] if max_downsample is None else max_downsample
    return [s for s in sites if s.downsample <= limit]


def check(target: Target, options: dict[str, Any]) -> list[_Site]:
    """Errors that depend on the model: a ``max_downsample`` that selects no layer, block scope where merging happens
    at the attention call, a cell depth on an image family; returns the selected sites."""
    from ...frameworks.diffusers import family_of

    if options["scope"] == "block" and target.family in CALL_FAMILIES:
        raise OptionError(f"tome: scope='block' serves {', '.join(BLOCK_FAMILIES)}; {target.family} merges at its "
                          f"attention calls only: use scope='attention'")
    if options["st"] != 1 and family_of(target.model).rank == 2:
        raise OptionError(f"tome: st={options['st']} is the cell depth in frames, and {target.family} has an image "
                          f"grid; use st=1")
    sites = _sites(target.model)
    if not sites:
        raise OptionError(f"tome: this {target.family} has no transformer block with self-attention to merge in")
    if options["ratio"] > 0 and not _selected(sites, options["max_downsample"]):
        levels = ", ".join(str(d) for d in sorted({s.downsample for s in sites}))
        raise OptionError(f"tome: max_downsample={options['max_downsample']} selects no layer of this "
                          f"{target.family}: its self-attention runs at downsampling {levels}; choose "
                          f"max_downsample >= {min(s.downsample for s in sites)} or None")
    return _selected(sites, options["max_downsample"])


class TomeDiffusersHandle(Handle):
    """Handle of ``tome`` on a diffusers model.

    ``token_counts``: for the last denoiser call (this thread's; read in a thread that ran none, another
    thread's), one ``(name, tokens in, tokens after merging)`` per merge, in execution order (``name`` the
    merged attention layer or block).
    """

    def __init__(self, *args: Any, state: _State, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state = state

    @property
    def token_counts(self) -> list[tuple[str, int, int]]:
        return list(self._state.calls.latest().token_counts)


class _Call:
    """What one denoiser call carries to the hooks: its grid and text length, the key of its destinations,
    the merges of each layer (pending until the layer's output is unmerged), the destinations per grid size,
    the counts."""

    def __init__(self, grid: tuple[int, ...] = (), text_tokens: int = 0, key: Tensor | int = 0) -> None:
        self.grid = grid
        self.text_tokens = text_tokens
        self.key = key
        self.token_counts: list[tuple[str, int, int]] = []
        self.partitions: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.pending: dict[str, list[Any]] = {}


class _State:
    """The method on one model: its options and the current call of each thread."""

    def __init__(self, model: nn.Module, options: dict[str, Any]) -> None:
        from ...frameworks.diffusers import layer_grids

        self.model = model
        self.ratio: float = options["ratio"]
        self.cell = (options["st"], options["sy"], options["sx"])
        self.strict: bool = options["strict"]
        self.calls: PerThread[_Call] = PerThread(_Call)
        self.grids = layer_grids(model)
        self._layouts: dict[tuple, Any] = {}

    def layer_grid(self, layer: int) -> tuple[int, ...]:
        return self.grids[layer].grid(self.calls.get().grid)

    def layout(self, layer: int, num_tokens: int) -> TokenLayout | None:
        """The layout of layer ``layer``'s sequence of ``num_tokens`` tokens in the running call (``None`` before a
        denoiser call)."""
        grid = self.calls.get().grid
        if not grid:
            return None
        return memo(self._layouts, (layer, grid, num_tokens), lambda: self.grids[layer].layout(grid, num_tokens))

    def decide(self, name: str, n: int, grid: tuple[int, ...], metric: Callable[[], Tensor]) -> CellMerge:
        """The merge of ``n`` tokens on ``grid`` (raster order) by the similarity of ``metric()`` ``[B, n, C]``."""
        if n != math.prod(grid):
            raise ShapeError(f"tome: {name} got {n} image tokens, expected a {'x'.join(map(str, grid))} grid")
        r = int(n * self.ratio)
        cell = self.cell[-len(grid):]
        call = self.calls.get()
        if r == 0 or any(g < c for g, c in zip(grid, cell)):
            merge = CellMerge(None, n)
        else:
            x = metric()
            if (grid, x.device) not in call.partitions:  # one partition per denoiser call and grid size
                call.partitions[grid, x.device] = cell_destinations(grid, cell, call.key, device=x.device)
            dst, src = call.partitions[grid, x.device]
            merge = match_to_cells(x, dst, src, r, strict=self.strict)
        call.token_counts.append((name, n, n - merge.r))
        return merge

    def pending(self, name: str) -> list[Any]:
        """The merges of ``name`` that the running call has not unmerged yet (innermost last)."""
        return self.calls.get().pending.setdefault(name, [])


def destination_key(seed: int, inputs: dict[str, Any]) -> Tensor | int:
    """The key of a denoiser call's destinations (:func:`~visattn.core.merge_sd.cell_destinations`): ``seed``
    and the call's timestep (its first, in thousandths), on the timestep's device; ``seed`` alone without one."""
    timestep = inputs.get("timestep")
    if timestep is None:
        return seed
    t = torch.as_tensor(timestep).flatten()[0].float()
    return (t * 1000).round().long() + seed * 1_000_003


def _merge_rope(rope: tuple[Tensor, Tensor] | None, merge: CellMerge,
                n_img: int) -> tuple[Tensor, Tensor] | None:
    """Flux's rotary tables ``[T + N, D]`` for the merged sequence: ``[B, T + N - r, D]`` per sample."""
    if rope is None or merge.r == 0:
        return rope
    batch = merge.slot.shape[0]
    text = rope[0].shape[0] - n_img

    def one(table: Tensor) -> Tensor:
        table = table[None].expand(batch, -1, -1)
        return torch.cat([table[:, :text], merge.select(table[:, text:])], dim=1)

    return one(rope[0]), one(rope[1])


def _hidden(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict[str, Any], x: Tensor) -> tuple[tuple, dict[str, Any]]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _check_no_mask(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs.get("attention_mask") is not None:
        raise ShapeError(f"tome: {name} was given an attention mask over its tokens, which merged tokens "
                         f"cannot follow; call it without attention_mask or use ratio=0")


def _attention_merge(state: _State, site: _Site, layer: int, name: str) -> tuple[Callable, Callable]:
    """``scope="attention"``: ``before(args, kwargs)`` merges the self-attention's image tokens (and Flux's rotary
    tables) in its call, ``after(output)`` unmerges its output."""

    def before(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        _check_no_mask(name, kwargs)
        x = _hidden(args, kwargs)
        start = state.calls.get().text_tokens if site.kind == "flux_single" else 0  # Flux single stream: text first
        image = x[:, start:]
        merge = state.decide(name, image.shape[1], state.layer_grid(layer), lambda: image)
        state.pending(name).append((merge, start))
        if merge.r == 0:
            return args, kwargs
        merged = merge.merge(image)
        args, kwargs = _with_hidden(args, kwargs, torch.cat([x[:, :start], merged], dim=1) if start else merged)
        if "image_rotary_emb" in kwargs:
            kwargs["image_rotary_emb"] = _merge_rope(kwargs["image_rotary_emb"], merge, image.shape[1])
        return args, kwargs

    def after(output: Any) -> Any:
        merge, start = state.pending(name).pop()
        if merge.r == 0:
            return output
        first = output[0] if isinstance(output, tuple) else output
        first = merge.unmerge(first) if not start else torch.cat([first[:, :start], merge.unmerge(first[:, start:])], 1)
        return (first, *output[1:]) if isinstance(output, tuple) else first

    return before, after


def _hook_block(patcher: Patcher, state: _State, site: _Site, active: Callable[[], bool]) -> None:
    """``scope="block"``: the block runs on merged tokens; its residual update is unmerged (while ``active()``:
    the block's attention runs the processor that installed this)."""
    layer = site.attentions[0][0]

    def before(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if not active():
            return None
        _check_no_mask(site.name, kwargs)
        x = _hidden(args, kwargs)  # image tokens only, in every supported block
        merge = state.decide(site.name, x.shape[1], state.layer_grid(layer), lambda: x)
        merged = merge.merge(x)
        state.pending(site.name).append((merge, x, merged))
        if merge.r == 0:
            return args, kwargs
        args, kwargs = _with_hidden(args, kwargs, merged)
        if "image_rotary_emb" in kwargs:
            kwargs["image_rotary_emb"] = _merge_rope(kwargs["image_rotary_emb"], merge, x.shape[1])
        return args, kwargs

    def after(output: Any) -> Any:
        pending = state.pending(site.name)
        if not pending:  # the block ran while inactive
            return output
        merge, x, merged = pending.pop()
        if merge.r == 0:
            return output
        if isinstance(output, tuple):  # SD3 and Flux blocks: (encoder_hidden_states, hidden_states)
            return output[0], merge.update(x, output[1], merged)
        return merge.update(x, output, merged)

    adapter("diffusers").around_call(site.block, patcher, before, after)


def _splice(t: Tensor, start: int, end: int, middle: Tensor) -> Tensor:
    """``t`` with its tokens ``[start, end)`` (axis 2) replaced by ``middle``."""
    if start == 0 and end == t.shape[2]:
        return middle
    return torch.cat([t[:, :, :start], middle, t[:, :, end:]], dim=2)


def _merged_mask(mask: Tensor, start: int, end: int, num_out: int) -> Tensor:
    """An SDPA ``mask`` for the merged sequence, the grid rows and columns ``[start, end)`` cut to ``num_out``.

    Merged tokens must share their mask: every grid row alike (where the mask has rows) and every row alike over
    the grid columns, as a text mask is; otherwise :class:`ShapeError`."""
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # [B | 1, H | 1, Nq | 1, Nk]
    for dim in (2, 3):
        size = m.shape[dim]
        if size == 1:
            continue
        grid = m.narrow(dim, start, end - start)
        low, high = (grid.all(dim), grid.any(dim)) if grid.dtype == torch.bool else (grid.amin(dim), grid.amax(dim))
        if not torch.equal(low, high):
            raise ShapeError(f"tome: the attention mask (shape {tuple(mask.shape)}) differs between grid tokens, "
                             f"which merged tokens cannot follow; only text tokens may be masked (or use ratio=0)")
        first = m.narrow(dim, start, 1)
        m = torch.cat([m.narrow(dim, 0, start), first.expand(*first.shape[:dim], num_out, *first.shape[dim + 1:]),
                       m.narrow(dim, end, size - end)], dim=dim)
    return m


def _call_merge(state: _State, layer: int, name: str) -> SDPAIntercept:
    """Merging at the attention call (:data:`CALL_FAMILIES`, module doc): an SDPA interception that answers layer
    ``layer``'s self-attention call with attention over its merged grid tokens, unmerged."""

    def answer(call: dict[str, Any]) -> Tensor | None:
        q, k, v = call["query"], call["key"], call["value"]
        n = q.shape[2]
        if k.shape[2] != n or call.get("is_causal") or n < math.prod(state.layer_grid(layer)):
            return None  # not the layer's self-attention; shorter: the merged call below (dynamo < 2.14 re-enters)
        layout = state.layout(layer, n)
        if layout is None or layout.grid is None:
            return None
        start, end = layout.grid_span
        merge = state.decide(name, end - start, layout.grid, lambda: k[:, :, start:end].mean(1))
        if merge.r == 0:
            return F.scaled_dot_product_attention(**call)
        shortened = {**call, **{arg: _splice(t, start, end, merge.merge(t[:, :, start:end], dim=2))
                                for arg, t in (("query", q), ("key", k), ("value", v))}}
        if call.get("attn_mask") is not None:
            shortened["attn_mask"] = _merged_mask(call["attn_mask"], start, end, merge.num_out)
        out = F.scaled_dot_product_attention(**shortened)
        stop = start + merge.num_out
        return _splice(out, start, stop, merge.unmerge(out[:, :, start:stop], dim=2))

    return SDPAIntercept(answer)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` ``[B, S, H, D]`` with per-sample tables ``[B, S, D]`` (Flux's pairing)."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos[:, :, None] + rotated.float() * sin[:, :, None]).to(x.dtype)


class PerSampleRopeFluxAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` for rotary tables given per sample (``[B, S, D]``), as merged
    sequences need; with shared tables (``[S, D]``) or none it calls the stock processor it replaces."""

    def __init__(self, stock: Callable[..., Any]) -> None:
        self.stock = stock

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None,
                 image_rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if image_rotary_emb is None or image_rotary_emb[0].dim() == 2:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        from ...frameworks.diffusers import flux_joint_output, flux_joint_qkv

        q, k, v = flux_joint_qkv(attn, hidden_states, encoder_hidden_states)
        cos, sin = image_rotary_emb
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask,
                                    backend=getattr(self.stock, "_attention_backend", None))
        return flux_joint_output(attn, out.flatten(2, 3).to(q.dtype), hidden_states, encoder_hidden_states)


class TomeAttnProcessor(LayerProcessor):
    """ToMe-SD (module doc) as a diffusers attention processor made for ``model`` (one of :data:`FAMILIES`).

    ``model.set_attn_processor(p := TomeAttnProcessor(model, ratio=0.5, scope="block"))`` merges as
    ``visattn.apply(model, "tome", ratio=0.5, scope="block")`` does (which installs this very processor);
    ``p.token_counts`` is the handle's. ``model.set_attn_processor(p.stock_processors)`` gives stock outputs
    again (block scope merges only around blocks whose attention runs ``p``) and ``p.detach()`` removes the
    hooks: the model's, which read each call's grid, and the blocks'. Options: those of ``tome`` on diffusers.
    """

    method = "tome"

    def __init__(self, model: nn.Module, *, patcher: Patcher | None = None, **options: Any) -> None:
        from ...frameworks import detect

        self.options = validate_options("tome", OPTIONS, options)
        target = detect(model)
        if target.family not in FAMILIES:
            raise UnsupportedModelError(f"tome does not support the diffusers model {target.family}; supported: "
                                        f"{', '.join(FAMILIES)}")
        self._sites = check(target, self.options)
        super().__init__(model, patcher)

    def setup(self) -> None:
        from ...frameworks.diffusers import call_grid, on_call

        model, options = self._model, self.options
        self.state = _State(model, options)
        def start(inputs: dict[str, Any]) -> None:
            self.state.calls.set(_Call(*call_grid(model, inputs), destination_key(options["seed"], inputs)))

        on_call(model, self._patcher, start)
        self._merges: dict[int, tuple[Callable, Callable]] = {}
        self._calls: dict[int, str] = {}  # layers merged at their attention call: their names
        self.layers: set[int] = set()  # the attention layers this processor serves
        for site in self._sites:
            self.layers.update(layer for layer, _ in site.attentions)
            if site.kind == "call":
                self._calls[site.attentions[0][0]] = site.name
            elif options["scope"] == "block":
                first = site.attentions[0][1]
                _hook_block(self._patcher, self.state, site, lambda first=first: first.processor is self)
            else:
                for layer, attn in site.attentions:
                    name = f"{site.name}.{_child_name(site.block, attn)}"
                    self._merges[layer] = _attention_merge(self.state, site, layer, name)
        # merged Flux sequences take their rotary tables per sample
        per_sample_rope = type(model).__name__ == "FluxTransformer2DModel" and options["ratio"] > 0
        self._served = {layer.index: PerSampleRopeFluxAttnProcessor(layer.stock) if per_sample_rope else layer.stock
                        for layer in self._layers.values() if layer.index in self.layers}

    @property
    def token_counts(self) -> list[tuple[str, int, int]]:
        """As :attr:`TomeDiffusersHandle.token_counts`."""
        return list(self.state.calls.latest().token_counts)

    def run(self, layer: StockLayer, attn: nn.Module, hidden_states: Tensor, kwargs: dict[str, Any]) -> Any:
        stock = self._served.get(layer.index)
        if stock is None:
            return layer.stock(attn, hidden_states, **kwargs)
        if layer.index in self._calls:
            if not self.state.calls.get().grid:  # called outside a denoiser call: no grid to merge on
                return stock(attn, hidden_states, **kwargs)
            return self.run_answered(layer, attn, hidden_states, kwargs,
                                     _call_merge(self.state, layer.index, self._calls[layer.index]))
        merge = self._merges.get(layer.index)
        if merge is None:  # block scope: the block's hooks merged already
            return stock(attn, hidden_states, **kwargs)
        before, after = merge
        args, kwargs = before((hidden_states,), kwargs)
        return after(stock(attn, *args, **kwargs))


def install(target: Target, patcher: Patcher, options: dict[str, Any]) -> TomeDiffusersHandle:
    """Patch ``target.model`` (one of :data:`FAMILIES`): :class:`TomeAttnProcessor` on the layers it serves."""
    from ...frameworks.diffusers import set_processors

    processor = TomeAttnProcessor(target.model, patcher=patcher, **{o.name: options[o.name] for o in OPTIONS})
    set_processors(target.model, patcher, lambda i, name, m: processor if i in processor.layers else None)
    return TomeDiffusersHandle("tome", target.model, options, patcher, state=processor.state)


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(n for n, m in parent.named_children() if m is child)
