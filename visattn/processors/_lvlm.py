"""What ``visual_sink`` and ``head_modulation`` share on transformers vision-language models.

:class:`ImageKeys` follows, forward by forward (``generate()`` included) and thread by thread, which query
rows and which key columns are image tokens: it reads ``input_ids``, ``attention_mask`` and the KV cache of each call
through :func:`visattn.frameworks.transformers.on_call`, finds the image tokens from
``config.image_token_id`` (per sample, so left padding and batches work), and keeps the image columns
of the KV cache from the forward that started it (empty cache) through every cached continuation. A
forward with an empty cache must show image tokens; a continuation must continue the cache the
previous forward left. With a static cache (``generate(cache_implementation="static")``) the model gets a 4-D mask
over the cache's capacity and every layer keys of that length: the columns are then that long, those not yet
filled marked as no image, and later forwards write their tokens' columns into that one tensor in place (marked as
a static address when the prefill made it: transformers compiles static-cache decoding with CUDA graphs, and a
tensor made by one graph replay and read by the next would be overwritten in between).

Under ``torch.compile`` nothing here reads a tensor on the host (a read is a graph break): the columns grow by
each forward's tokens whatever they are, and the check that a prompt holds image tokens is made in eager
forwards only (a compiled one without them leaves the attention as it is: there is no image to act on).

:func:`rows_index` turns a per-sample row mask into the ``[B, R]`` index that
:func:`visattn.core.redistribute.attend_rows` takes, and :func:`write_rows` puts rows computed that way
back into the stock attention output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError, UnsupportedModelError
from ..frameworks.base import LazyAdapter, PerThread
from ..patching import Patcher

if TYPE_CHECKING:
    from ..frameworks.transformers import ModelCall

tfa = LazyAdapter("transformers")  # imported on first use: visattn imports without transformers


def image_token_id(model: nn.Module, method: str) -> int:
    """``config.image_token_id``, after checking that visattn can read ``model``'s calls (both before patching)."""
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        raise UnsupportedModelError(f"{method}: {type(model).__name__}'s config has no image_token_id; "
                                    f"supported: {tfa.SUPPORTED}")
    tfa.check_calling_convention(model)
    return int(token)


def full_layers(model: nn.Module) -> list[int]:
    """Positions among the language model's decoder layers of those that attend to the whole sequence: every layer but
    the sliding-window ones (Gemma 3's), whose KV cache keeps only the last keys, so that the image tokens' key columns
    a method reweights while decoding are not there. Those run stock."""
    text = model.config.get_text_config()
    kinds = getattr(text, "layer_types", None) or ()
    sliding = {i for i, kind in enumerate(kinds) if kind == "sliding_attention"} if getattr(
        text, "sliding_window", None) else set()
    return [i for i in range(len(tfa.decoder_layers(model))) if i not in sliding]


class _Forward:
    """One thread's view of the forward it runs (see :class:`ImageKeys`); ``columns`` and ``num_keys`` carry
    over from forward to forward of one generation."""

    def __init__(self) -> None:
        self.columns: Tensor | None = None
        self.num_keys: int | None = 0  # None after compiled decode steps, which count on the device
        self.memo: dict[str, Any] = {}


class ImageKeys:
    """Image rows and columns of the current forward of a transformers VLM, kept per thread (two threads
    generating with one model each see their own).

    Attributes (valid inside a forward):
        fresh: the forward has no past (prefill or a forward without cache).
        real: ``[B, q]`` bool, the forward's tokens that the attention mask keeps.
        image: ``[B, q]`` bool, the forward's image tokens.
        after_image: ``[B, q]`` bool, tokens with an image token at or before them (cache included).
        columns: ``[B, n]`` bool, image key columns from the start of the cache (``n``: the key count).
        first_real: ``[B]`` int, the first real token of each sample (of the fresh forward).
    """

    def __init__(self, model: nn.Module, patcher: Patcher, method: str,
                 then: Callable[[ModelCall], None] | None = None) -> None:
        """Follow ``model``'s forwards; ``then(call)`` runs after each forward's start has been read, in the same
        hook (one hook of the model: ``torch.compile`` traces the hooks of a compiled module each in a frame of
        its own, and a hook frame that does nothing in some call is skipped in later ones)."""
        self.method = method
        self.token = image_token_id(model, method)
        self._forwards: PerThread[_Forward] = PerThread(_Forward)
        self._then = then
        tfa.on_call(model, patcher, self._start)

    def __getattr__(self, name: str) -> Any:  # the attributes of this thread's forward
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._forwards.get(), name)

    def _start(self, call: ModelCall) -> None:
        ids = call.input_ids
        if ids is None:
            raise ShapeError(f"{self.method}: pass input_ids (image positions are read from config.image_token_id "
                             f"= {self.token}); inputs_embeds alone do not show them")
        now = self._forwards.get()
        held = tfa.held_tokens(call.cache)
        counted = isinstance(held, int)  # (not in compiled decode steps on a static cache: a count on the device)
        q = ids.shape[1]
        rows = slice(held, held + q) if counted else held + torch.arange(q, device=ids.device)
        keys = attended_keys(call.attention_mask, held + q if counted else q)
        now.real = keys[:, rows] if keys is not None else torch.ones_like(ids, dtype=torch.bool)
        # the key count of the attention layers: the mask's, or without one (no padding) a static cache's slots
        width = keys.shape[1] if keys is not None else tfa.static_slots(call.cache) or held + q
        now.image = (ids == self.token) & now.real
        now.fresh = tfa.first_forward(held)
        if now.fresh:
            if not torch.compiler.is_compiling() and not bool(now.image.any()):
                raise ShapeError(f"{self.method}: the input has no image tokens (config.image_token_id = "
                                 f"{self.token}); the method needs the image in the prompt")
            now.columns = F.pad(now.image, (0, width - q))
            if width > q and not torch.compiler.is_compiling():  # a static cache: one tensor for the generation
                torch._dynamo.mark_static_address(now.columns)
            now.first_real = now.real.int().argmax(1)
            now.after_image = now.image.cumsum(1) > 0
        else:
            if now.columns is None or (counted and now.num_keys is not None and held != now.num_keys):
                raise ShapeError(f"{self.method}: this forward continues a KV cache of {held} tokens that the "
                                 f"method did not see being built; start from a forward without past_key_values")
            seen = now.columns.any(1, keepdim=True)
            now.after_image = seen | (now.image.cumsum(1) > 0)
            if now.columns.shape[1] == width:  # a static cache: written in place (see the class docstring)
                now.columns[:, rows] = now.image
            else:
                now.columns = torch.cat([now.columns[:, :held], now.image], 1)
                now.columns = F.pad(now.columns, (0, width - now.columns.shape[1]))
        # compiled decode steps count on the device only (see held_tokens): unknown here from then on
        now.num_keys = held + q if counted else None
        now.memo = {}
        if self._then is not None:
            self._then(call)

    def text_rows(self) -> tuple[Tensor, Tensor] | None:
        """:func:`rows_index` of this forward's text rows: real, not image, with an image before them."""
        return self.once("text_rows", lambda: rows_index(self.real & ~self.image & self.after_image))

    def last_row(self) -> Tensor:
        """``[B, 1]``: the index of this forward's last row (the generating one), for
        :func:`visattn.core.redistribute.attend_rows`."""
        return self.once("last_row", lambda: torch.full((self.real.shape[0], 1), self.real.shape[1] - 1,
                                                        device=self.real.device))

    def once(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per forward (layers share it)."""
        memo = self._forwards.get().memo
        if name not in memo:
            memo[name] = make()
        return memo[name]


def attended_keys(mask: Tensor | dict[str, Tensor] | None, seen: int) -> Tensor | None:
    """The keys a call attends, ``[B, K]`` bool, from its attention mask: a 2-D padding mask ``[B, seen]`` as it is;
    a 4-D mask ``[B, 1, q, K]`` (what ``generate()`` passes with a static KV cache, ``K`` its capacity; for models
    with several kinds of layers, the full-attention entry of the masks it passes by kind) by its last row, which
    sees every real key so far and none after. ``None``: no mask (every key is real)."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention")
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask.bool()
    if mask.dim() == 4 and mask.shape[-1] >= seen:
        last = mask[:, 0, -1]
        return last if last.dtype == torch.bool else last == 0
    raise ShapeError(f"attention_mask must be [batch, tokens] or [batch, 1, queries, keys] with at least {seen} keys; "
                     f"got shape {tuple(mask.shape)}")


def rows_index(rows: Tensor) -> tuple[Tensor, Tensor] | None:
    """``[B, q]`` bool -> (``index`` ``[B, R]`` of the True rows, first in order, ``valid`` ``[B, R]``), or
    ``None`` when no row is True. ``R`` is the largest count (read on the host), or under ``torch.compile`` ``q``
    (a shape known when tracing); a sample's slots past its count are not valid."""
    counts = rows.sum(1)
    r = rows.shape[1] if torch.compiler.is_compiling() else int(counts.max())
    if r == 0:
        return None
    order = torch.sort((~rows).int(), dim=1, stable=True).indices[:, :r]
    return order, torch.arange(r, device=rows.device) < counts[:, None]


def write_rows(out: Tensor, new: Tensor, index: Tensor, valid: Tensor | None = None) -> Tensor:
    """``out`` ``[B, q, H, D]`` with rows ``index`` ``[B, R]`` replaced by ``new`` ``[B, H, R, D]`` where ``valid``."""
    b, r = index.shape
    where = index[:, :, None, None].expand(b, r, *out.shape[2:])
    new = new.transpose(1, 2).to(out.dtype)
    if valid is not None:
        new = torch.where(valid[:, :, None, None], new, out.gather(1, where))
    return out.scatter(1, where, new)
