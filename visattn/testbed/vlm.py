"""The testbed VLM: a LLaVA-style ``LlavaForConditionalGeneration`` that answers questions about :mod:`.data` scenes.

Built from configs (nothing is downloaded):

- vision tower: a ``CLIPVisionModel`` holding the shipped testbed ViT (:mod:`.vit`) exactly —
  64x64 input, 8x8 patches, width 192, depth 6, 3 heads, exact GELU, LayerNorm eps 1e-6. timm's
  patch-embedding bias is folded into CLIP's patch position embeddings and CLIP's ``pre_layrnorm``
  (which timm's ViT does not have) is replaced by ``nn.Identity`` (:func:`vit_to_clip`). It is frozen
  in training. The LLM sees the 64 patch tokens of layer ``-2`` (LLaVA's default feature layer and
  strategy: the class token is dropped);
- projector: LLaVA's two-layer GELU MLP, 192 -> 128 -> 128;
- language model: a Llama of :data:`TEXT_CONFIG` (4 layers, width 128, MLP 256, 4 heads), tied embeddings;
- tokenizer: word-level (``tokenizers``' ``WordLevel``, lower-cased, split on whitespace and
  punctuation) over the generator's vocabulary (:func:`vocabulary`), with ``<pad>``, ``<unk>`` and
  ``<image>`` (the config's ``image_token_id``); saved as ``vlm_tokenizer.json``.

A prompt is the 64 image tokens followed by a question (:func:`prompt_ids`); the answer is the
first greedily generated token (:func:`answer`), one word: ``yes``/``no``, a colour or a number word.
A caption is what the model generates greedily after :data:`CAPTION_PROMPT`, up to and including
its first ``.`` (:func:`caption`); :func:`chair_metrics` scores the objects it names (CHAIR).
:func:`train_vlm` teaches the projector and the Llama, teacher-forced, to answer the generator's
POPE presence, colour and count questions (several per image in one sequence, the loss on the
answer words only) and, in a ``caption_share`` of the training sequences, to caption (the image,
:data:`CAPTION_PROMPT`, then the scene's reference caption of :data:`CAPTION_FORM`, the loss on the
caption), and writes ``vlm.safetensors`` (fp16), ``vlm.json`` and the tokenizer. Captioning adds
no word to the vocabulary, so checkpoints trained before it still load (they only caption badly).
``scripts/train_testbed_vlm.py`` runs it; :func:`load_vlm` loads weights in this layout (by default
those in ``visattn/testbed/weights/``; none ship yet, as no run has reached POPE accuracy >= 85% on
the random split: CPU-only runs reach about 73%).
"""

from __future__ import annotations

import json
import math
import platform
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import (
    BACKGROUNDS,
    COLOURS,
    NUMBER_WORDS,
    POPE_SPLITS,
    SHAPES,
    ObjectStatistics,
    Scene,
    captions,
    colour_questions,
    count_questions,
    multi_object_scene,
    object_statistics,
    plural,
    pope_questions,
    rng_for,
)
from .vit import MEAN, SHIPPED_WEIGHTS, STD, VIT_CONFIG, to_input

WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_VLM = WEIGHTS_DIR / "vlm.safetensors"
SHIPPED_TOKENIZER = WEIGHTS_DIR / "vlm_tokenizer.json"
PAD, UNK, IMAGE = "<pad>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, IMAGE)
IMAGE_TOKENS = (VIT_CONFIG["img_size"] // VIT_CONFIG["patch_size"]) ** 2
TEXT_CONFIG: dict[str, Any] = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                               "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
                               "tie_word_embeddings": True}
#: the scenes whose object statistics define POPE's popular and adversarial negatives (train split).
STATS_SCENES = 2000
QUESTION_KINDS: tuple[str, ...] = ("pope", "colour", "count")
#: the prompt that asks for a caption (words of :func:`vocabulary` only, so older tokenizers encode it).
CAPTION_PROMPT = "What is in the image?"
#: which of :func:`~.data.captions`' reference forms the model learns: "an image with <n> shapes: <objects>."
CAPTION_FORM = 1
#: a caption ends at its first full stop; the longest reference caption is 22 tokens.
CAPTION_END = "."
CAPTION_TOKENS = 24


def vocabulary() -> list[str]:
    """Every word the generator's questions, answers and captions use, special tokens first; deterministic."""
    words = ["is", "there", "a", "an", "in", "the", "image", "what", "colour", "how", "many", "shapes", "shape",
             "are", "yes", "no", "on", "background", "with", "and", "?", ".", ",", ":", "(", ")"]
    words += list(SHAPES) + [plural(s) for s in SHAPES] + list(COLOURS) + list(NUMBER_WORDS) + list(BACKGROUNDS)
    out: list[str] = list(SPECIAL_TOKENS)
    for w in words:
        if w not in out:
            out.append(w)
    return out


def build_tokenizer() -> Any:
    """The word-level tokenizer (a ``tokenizers.Tokenizer``) over :func:`vocabulary`."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocabulary())}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, glues punctuation
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def load_tokenizer(path: str | Path | None = None) -> Any:
    from tokenizers import Tokenizer

    path = Path(path) if path is not None else SHIPPED_TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(f"no testbed VLM tokenizer at {path}; train the VLM with scripts/train_testbed_vlm.py")
    return Tokenizer.from_file(str(path))


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text``; a word outside the vocabulary is an error (the testbed never needs ``<unk>``)."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    unk = tokenizer.token_to_id(UNK)
    if unk in enc.ids:
        bad = [text[a:b] for (a, b), i in zip(enc.offsets, enc.ids) if i == unk]
        raise ValueError(f"words outside the testbed VLM's vocabulary in {text!r}: {', '.join(map(repr, bad))}")
    return list(enc.ids)


def build_vlm(vocab_size: int | None = None, attn_implementation: str = "sdpa") -> nn.Module:
    """The testbed VLM with fresh weights (the vision tower's ``pre_layrnorm`` already an identity)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = vocabulary()
    vision = CLIPVisionConfig(hidden_size=VIT_CONFIG["embed_dim"], num_hidden_layers=VIT_CONFIG["depth"],
                              num_attention_heads=VIT_CONFIG["num_heads"],
                              intermediate_size=int(VIT_CONFIG["embed_dim"] * VIT_CONFIG["mlp_ratio"]),
                              image_size=VIT_CONFIG["img_size"], patch_size=VIT_CONFIG["patch_size"],
                              hidden_act="gelu", layer_norm_eps=1e-6)
    text = LlamaConfig(vocab_size=vocab_size or len(vocab), pad_token_id=vocab.index(PAD), **TEXT_CONFIG)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab.index(IMAGE),
                      pad_token_id=vocab.index(PAD), vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=IMAGE_TOKENS, projector_hidden_act="gelu", tie_word_embeddings=True)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    model.model.vision_tower.pre_layrnorm = nn.Identity()
    return model


def vit_to_clip(vit_state: dict[str, Tensor], prefix: str = "model.vision_tower.") -> dict[str, Tensor]:
    """The testbed ViT's timm state dict as the VLM's CLIP vision-tower state dict (the same function)."""
    out = {f"{prefix}embeddings.class_embedding": vit_state["cls_token"].reshape(-1),
           f"{prefix}embeddings.patch_embedding.weight": vit_state["patch_embed.proj.weight"],
           f"{prefix}post_layernorm.weight": vit_state["norm.weight"],
           f"{prefix}post_layernorm.bias": vit_state["norm.bias"]}
    pos = vit_state["pos_embed"][0].clone()
    pos[1:] += vit_state["patch_embed.proj.bias"]  # CLIP's patch embedding has no bias
    out[f"{prefix}embeddings.position_embedding.weight"] = pos
    for i in range(VIT_CONFIG["depth"]):
        src, dst = f"blocks.{i}.", f"{prefix}encoder.layers.{i}."
        for name in ("weight", "bias"):
            q, k, v = vit_state[f"{src}attn.qkv.{name}"].chunk(3)
            out[f"{dst}self_attn.q_proj.{name}"], out[f"{dst}self_attn.k_proj.{name}"] = q, k
            out[f"{dst}self_attn.v_proj.{name}"] = v
            out[f"{dst}self_attn.out_proj.{name}"] = vit_state[f"{src}attn.proj.{name}"]
            out[f"{dst}layer_norm1.{name}"] = vit_state[f"{src}norm1.{name}"]
            out[f"{dst}layer_norm2.{name}"] = vit_state[f"{src}norm2.{name}"]
            out[f"{dst}mlp.fc1.{name}"] = vit_state[f"{src}mlp.fc1.{name}"]
            out[f"{dst}mlp.fc2.{name}"] = vit_state[f"{src}mlp.fc2.{name}"]
    return out


def load_vlm(path: str | Path | None = None, tokenizer: str | Path | None = None, device: str | torch.device = "cpu",
             attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """The testbed VLM (float32, eval mode) and its tokenizer, from ``path`` (default: the shipped weights)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else SHIPPED_VLM
    if not path.is_file():
        raise FileNotFoundError(f"no testbed VLM weights at {path}; train them with scripts/train_testbed_vlm.py")
    tok = load_tokenizer(tokenizer if tokenizer is not None else path.with_name("vlm_tokenizer.json"))
    model = build_vlm(tok.get_vocab_size(), attn_implementation)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    state.setdefault("lm_head.weight", state["model.language_model.embed_tokens.weight"])
    model.load_state_dict(state)
    return model.to(device).eval(), tok


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """The 64 image tokens then the question's tokens."""
    return [tokenizer.token_to_id(IMAGE)] * IMAGE_TOKENS + encode(tokenizer, question)


# ---------------------------------------------------------------------------------------------------------------
# data


def scenes(split: str, n: int, *, seed: int = 0, start: int = 0, workers: int = 1) -> list[Scene]:
    """Multi-object scenes ``start .. start+n-1`` of ``split`` (:func:`~.data.multi_object_scene`)."""
    rng_for(seed, split, start)
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    if workers > 1 and n > 200:
        chunk = -(-n // workers)
        jobs = [(seed, split, a, min(a + chunk, start + n)) for a in range(start, start + n, chunk)]
        with ProcessPoolExecutor(workers) as pool:
            return [s for part in pool.map(_scene_chunk, jobs) for s in part]
    return _scene_chunk((seed, split, start, start + n))


def _scene_chunk(args: tuple[int, str, int, int]) -> list[Scene]:
    seed, split, a, b = args
    return [multi_object_scene(seed, split, i) for i in range(a, b)]


@lru_cache(maxsize=4)
def pope_statistics(seed: int = 0) -> ObjectStatistics:
    """Object statistics of the first :data:`STATS_SCENES` training scenes: POPE's negative pools."""
    return object_statistics(_scene_chunk((seed, "train", 0, STATS_SCENES)))


def questions(scene: Scene, stats: ObjectStatistics, seed: int, split: str, index: int
              ) -> dict[str, list[tuple[str, str]]]:
    """The scene's POPE questions per POPE split, colour and count questions; deterministic in the arguments."""
    out: dict[str, list[tuple[str, str]]] = {}
    for j, pope in enumerate(POPE_SPLITS):
        rng = np.random.default_rng([seed, 100 + SPLITS_INDEX[split], index, j])
        out[pope] = pope_questions(scene, stats, pope, rng)
    out["colour"] = colour_questions(scene)
    out["count"] = count_questions(scene)
    return out


SPLITS_INDEX = {"train": 0, "val": 1, "test": 2}


def _training_sequence(qs: dict[str, list[tuple[str, str]]], tok: Any, rng: np.random.Generator, max_qa: int
                       ) -> tuple[list[int], list[int]]:
    """Image tokens then up to ``max_qa`` question-answer pairs (the POPE questions of all three splits,
    without repeats, colour, count), shuffled; labels are -100 except on the answers."""
    pope = list(dict.fromkeys(qa for split in POPE_SPLITS for qa in qs[split]))
    pairs = pope + qs["colour"] + qs["count"]
    return _sequence([pairs[i] for i in rng.permutation(len(pairs))[:max_qa]], tok)


def _caption_sequence(scene: Scene, tok: Any) -> tuple[list[int], list[int]]:
    """Image tokens, :data:`CAPTION_PROMPT` and the scene's reference caption; labels on the caption only."""
    return _sequence([(CAPTION_PROMPT, captions(scene)[CAPTION_FORM])], tok)


def _sequence(pairs: Sequence[tuple[str, str]], tok: Any) -> tuple[list[int], list[int]]:
    """Image tokens then the ``(prompt, target)`` pairs; labels are -100 except on the targets."""
    ids = [tok.token_to_id(IMAGE)] * IMAGE_TOKENS
    labels = [-100] * IMAGE_TOKENS
    for q, a in pairs:
        q_ids, a_ids = encode(tok, q), encode(tok, a)
        ids += q_ids + a_ids
        labels += [-100] * len(q_ids) + a_ids
    return ids, labels


# ---------------------------------------------------------------------------------------------------------------
# answering


@torch.no_grad()
def image_features(model: nn.Module, images: np.ndarray, device: str | torch.device, batch_size: int = 500
                   ) -> Tensor:
    """The vision tower's layer ``-2`` patch features ``[N, 64, 192]`` (what the projector sees)."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    out = []
    for a in range(0, len(images), batch_size):
        hs = tower(to_input(images[a:a + batch_size], device), output_hidden_states=True).hidden_states
        out.append(hs[layer][:, 1:])
    return torch.cat(out)


@torch.no_grad()
def answer(model: nn.Module, tokenizer: Any, images: np.ndarray, questions: Sequence[str],
           device: str | torch.device = "cpu", batch_size: int = 200, on_batch: Any = None) -> list[str]:
    """The model's one-word answer to ``questions[i]`` about ``images[i]``: its first greedy token.

    Prompts of equal length are batched together, so no prompt is padded; each batch is one full
    ``model(input_ids, pixel_values, attention_mask)`` forward pass (what visattn's methods patch);
    ``on_batch(k)`` is called after each, with the number of questions it answered.
    """
    if len(images) != len(questions):
        raise ValueError(f"one image per question: got {len(images)} images and {len(questions)} questions")
    ids = [prompt_ids(tokenizer, q) for q in questions]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out: list[str] = [""] * len(ids)
    a = 0
    while a < len(order):
        b = a
        while b < len(order) and b - a < batch_size and len(ids[order[b]]) == len(ids[order[a]]):
            b += 1
        chunk = order[a:b]
        input_ids = torch.tensor([ids[i] for i in chunk], device=device)
        pixels = to_input(images[chunk], device)
        logits = model(input_ids=input_ids, pixel_values=pixels, attention_mask=torch.ones_like(input_ids),
                       logits_to_keep=1).logits[:, -1]
        for i, t in zip(chunk, logits.argmax(-1).tolist()):
            out[i] = tokenizer.id_to_token(t)
        if on_batch is not None:  # e.g. a progress bar's update, or a recording method's clear
            on_batch(len(chunk))
        a = b
    return out


@torch.no_grad()
def caption(model: nn.Module, tokenizer: Any, images: np.ndarray, device: str | torch.device = "cpu",
            batch_size: int = 200, max_new_tokens: int = CAPTION_TOKENS, on_batch: Any = None) -> list[str]:
    """The model's caption of each image: greedy ``generate()`` (with its KV cache) after
    :data:`CAPTION_PROMPT`, up to and including the first ``.`` or ``max_new_tokens`` tokens.

    Every prompt has the same length, so batches are not padded; ``on_batch(k)`` is called after each.
    """
    ids = prompt_ids(tokenizer, CAPTION_PROMPT)
    end, pad = tokenizer.token_to_id(CAPTION_END), tokenizer.token_to_id(PAD)
    out: list[str] = []
    for a in range(0, len(images), batch_size):
        chunk = images[a:a + batch_size]
        input_ids = torch.tensor([ids] * len(chunk), device=device)
        new = model.generate(input_ids=input_ids, pixel_values=to_input(chunk, device),
                             attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=end, pad_token_id=pad)[:, len(ids):].tolist()
        for row in new:
            row = row[:row.index(end) + 1] if end in row else row
            out.append(tokenizer.decode([t for t in row if t != pad]))
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def mentioned_shapes(text: str) -> set[str]:
    """The shapes a caption names, singular or plural (``"two circles and a star."`` -> ``{circle, star}``)."""
    names = {**{s: s for s in SHAPES}, **{plural(s): s for s in SHAPES}}
    return {names[w] for w in re.findall(r"[a-z]+", text.lower()) if w in names}


def chair_metrics(texts: Sequence[str], present: Sequence[set[str]]) -> dict[str, float]:
    """CHAIR object hallucination (Rohrbach et al., 2018) of captions ``texts`` of images holding ``present``.

    Each caption counts each shape it names once (:func:`mentioned_shapes`). ``chair_i``: named shapes
    absent from their image over all named shapes; ``chair_s``: captions naming at least one absent
    shape over all captions; ``recall``: present shapes named over all present shapes; ``mentions``:
    named shapes per caption.
    """
    if len(texts) != len(present):
        raise ValueError(f"one object set per caption: got {len(texts)} captions and {len(present)} sets")
    named = [mentioned_shapes(t) for t in texts]
    mentions = sum(len(m) for m in named)
    wrong = [len(m - p) for m, p in zip(named, present)]
    hits = sum(len(m & p) for m, p in zip(named, present))
    return {"chair_i": round(sum(wrong) / max(mentions, 1), 6),
            "chair_s": round(sum(w > 0 for w in wrong) / max(len(texts), 1), 6),
            "recall": round(hits / max(sum(len(p) for p in present), 1), 6),
            "mentions": round(mentions / max(len(texts), 1), 6), "n": len(texts)}


def pope_metrics(answers: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """POPE's accuracy, precision, recall, F1 (``yes`` is positive) and yes-ratio; any non-``yes`` answer is a no."""
    pred = np.array([a == "yes" for a in answers])
    gold = np.array([t == "yes" for t in truth])
    tp, fp, fn = int((pred & gold).sum()), int((pred & ~gold).sum()), int((~pred & gold).sum())
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"accuracy": round(float((pred == gold).mean()), 6), "precision": round(precision, 6),
            "recall": round(recall, 6), "f1": round(f1, 6), "yes_ratio": round(float(pred.mean()), 6)}


def question_set(split: str, n: int, seed: int = 0, stats: ObjectStatistics | None = None
                 ) -> tuple[np.ndarray, dict[str, list[tuple[int, str, str]]], list[set[str]]]:
    """Images of scenes ``0 .. n-1`` of ``split``; per kind (POPE splits, colour, count), the
    ``(image index, question, answer)`` triples; and the shapes present in each image."""
    stats = stats if stats is not None else pope_statistics(seed)
    sc = scenes(split, n, seed=seed)
    kinds: dict[str, list[tuple[int, str, str]]] = {k: [] for k in (*POPE_SPLITS, "colour", "count")}
    for i, s in enumerate(sc):
        for kind, qa in questions(s, stats, seed, split, i).items():
            kinds[kind] += [(i, q, a) for q, a in qa]
    return np.stack([s.image for s in sc]), kinds, [{o.shape for o in s.objects} for s in sc]


@dataclass
class TestbedVLM:
    """The testbed VLM with its tokenizer, answering (:func:`answer`) and captioning (:func:`caption`)
    through the interface :func:`evaluate` shares with :class:`~.hf_vlm.HFVLM`."""

    model: nn.Module
    tokenizer: Any
    device: str | torch.device = "cpu"

    def answer(self, images: np.ndarray, questions: Sequence[str], batch_size: int = 200, on_batch: Any = None,
               yes_no: bool = False) -> list[str]:
        """One-word answers; ``yes_no`` changes nothing (the answer is already one word)."""
        return answer(self.model, self.tokenizer, images, questions, self.device, batch_size, on_batch)

    def caption(self, images: np.ndarray, batch_size: int = 200, on_batch: Any = None,
                max_new_tokens: int = CAPTION_TOKENS) -> list[str]:
        return caption(self.model, self.tokenizer, images, self.device, batch_size, max_new_tokens, on_batch)


#: question kinds answered with a word; every other kind is a POPE (yes/no) kind.
WORD_KINDS: tuple[str, ...] = ("colour", "count")


def evaluate(vlm: Any, images: np.ndarray | Sequence[Any], kinds: dict[str, list[tuple[int, str, str]]],
             batch_size: int = 200, on_batch: Any = None, present: Sequence[set[str]] | None = None
             ) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Metrics per kind and the answers ``vlm`` (a :class:`TestbedVLM` or :class:`~.hf_vlm.HFVLM`) gives.

    ``kinds`` maps a kind to ``(image index, question, answer)`` triples: a POPE kind (any but
    :data:`WORD_KINDS`) gets :func:`pope_metrics`, colour and count their accuracy. With ``present``
    (the shapes in each image), also ``"caption"``: the caption of every image and its CHAIR
    metrics (:func:`chair_metrics`).
    """
    metrics: dict[str, Any] = {}
    answers: dict[str, list[str]] = {}
    if present is not None:
        answers["caption"] = vlm.caption(images, batch_size, on_batch)
        metrics["caption"] = chair_metrics(answers["caption"], present)
    for kind, triples in kinds.items():
        index = [t[0] for t in triples]
        pics = images[index] if isinstance(images, np.ndarray) else [images[i] for i in index]
        got = vlm.answer(pics, [t[1] for t in triples], batch_size, on_batch, yes_no=kind not in WORD_KINDS)
        answers[kind] = got
        truth = [t[2] for t in triples]
        if kind not in WORD_KINDS:
            metrics[kind] = pope_metrics(got, truth)
        else:
            metrics[kind] = {"accuracy": round(float(np.mean([g == t for g, t in zip(got, truth)])), 6)}
        metrics[kind]["n"] = len(triples)
    return metrics, answers


# ---------------------------------------------------------------------------------------------------------------
# training


def train_vlm(out_dir: str | Path, *, steps: int = 1500, batch_size: int = 32, train_size: int = 8000,
              val_size: int = 60, test_size: int = 500, max_qa: int = 16, caption_share: float = 0.25,
              lr: float = 2e-3, weight_decay: float = 0.01, warmup: int = 100, seed: int = 0, workers: int = 1,
              device: str | None = None, threads: int | None = None, vit_weights: str | Path | None = None,
              init: str | Path | None = None, log_every: int = 250) -> dict[str, Any]:
    """Train the testbed VLM's projector and Llama (the ViT vision tower frozen) and write
    ``vlm.safetensors``, ``vlm_tokenizer.json`` and ``vlm.json`` to ``out_dir``.

    Training, validation and test images are scenes ``0 .. n-1`` of the ``train``, ``val`` and
    ``test`` splits of :func:`~.data.multi_object_scene` with ``seed``; the vision tower's features
    of the training images are computed once. Each training image gives a question sequence
    (:func:`_training_sequence`) and a caption sequence (:func:`_caption_sequence`); a batch row is
    the caption sequence with probability ``caption_share``. ``init``: a ``vlm.safetensors`` to start from (a
    continued run; its ``vlm.json``, when beside it, is recorded as the earlier stage). Returns the
    metrics written to ``vlm.json``.
    """
    from safetensors.torch import load_file, save_file

    if min(steps, batch_size, train_size, val_size, test_size, max_qa) < 1:
        raise ValueError("steps, batch_size, max_qa and the split sizes must all be >= 1")
    if not 0.0 <= caption_share < 1.0:
        raise ValueError(f"caption_share must be in [0, 1) (got {caption_share})")
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = build_tokenizer()
    stats = pope_statistics(seed)
    train_scenes = scenes("train", train_size, seed=seed, workers=workers)
    rng = np.random.default_rng([seed, 7])
    seqs = [_training_sequence(questions(s, stats, seed, "train", i), tok, rng, max_qa)
            for i, s in enumerate(train_scenes)]
    seqs += [_caption_sequence(s, tok) for s in train_scenes]  # row train_size + i: image i's caption
    train_images = np.stack([s.image for s in train_scenes])
    del train_scenes
    val_images, val_kinds, val_present = question_set("val", val_size, seed, stats)
    test_images, test_kinds, test_present = question_set("test", test_size, seed, stats)

    torch.manual_seed(seed)
    model = build_vlm(tok.get_vocab_size())
    vit_path = Path(vit_weights) if vit_weights is not None else SHIPPED_WEIGHTS
    vit_state = {k: v.float() for k, v in load_file(str(vit_path)).items()}
    missing, unexpected = model.load_state_dict(vit_to_clip(vit_state), strict=False)
    assert not unexpected and not any(k.startswith("model.vision_tower.") for k in missing), (missing, unexpected)
    earlier = None
    if init is not None:
        init = Path(init)
        start = {k: v.float() for k, v in load_file(str(init)).items()}
        start.setdefault("lm_head.weight", start["model.language_model.embed_tokens.weight"])
        model.load_state_dict(start)
        if init.with_name("vlm.json").is_file():
            earlier = json.loads(init.with_name("vlm.json").read_text())
    model.to(device)
    model.model.vision_tower.requires_grad_(False)
    testbed = TestbedVLM(model, tok, device)
    feats = image_features(model, train_images, device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    data_s = time.time() - t0
    print(f"data: {train_size}/{val_size}/{test_size} scenes, features {tuple(feats.shape)} in {data_s:.1f} s",
          flush=True)

    pad = tok.token_to_id(PAD)
    length = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(lab)] = torch.tensor(lab)
    ids, labels = ids.to(device), labels.to(device)
    image_id = tok.token_to_id(IMAGE)
    lm, projector = model.model.language_model, model.model.multi_modal_projector
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) /
                                                                                   max(1, steps - warmup))))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    history = []
    t1 = time.time()
    model.train()
    model.model.vision_tower.eval()
    for step in range(1, steps + 1):
        idx = torch.randint(0, train_size, (batch_size,), generator=gen)
        row = idx + train_size * (torch.rand(batch_size, generator=gen) < caption_share)
        idx, row = idx.to(device), row.to(device)
        x, y = ids[row], labels[row]
        width = int((x != pad).sum(1).max())
        x, y = x[:, :width], y[:, :width]
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            emb = lm.embed_tokens(x)
            vis = projector(feats[idx]).to(emb.dtype)
            emb = emb.masked_scatter((x == image_id)[..., None], vis)
            hidden = lm(inputs_embeds=emb, attention_mask=(x != pad).long()).last_hidden_state
            logits = model.lm_head(hidden[:, :-1]).float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            model.eval()
            val, _ = evaluate(testbed, val_images, val_kinds, present=val_present)
            model.train()
            model.model.vision_tower.eval()
            line = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - t1, 1),
                    **{k: v["accuracy"] for k, v in val.items() if k != "caption"},
                    **{f"caption_{k}": val["caption"][k] for k in ("chair_i", "recall")}}
            history.append(line)
            print(" ".join(f"{k} {v}" for k, v in line.items()), flush=True)
    train_s = time.time() - t1
    model.eval()
    weights = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}  # tied to the embeddings
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)  # measure what is shipped
    val, _ = evaluate(testbed, val_images, val_kinds, present=val_present)
    test, _ = evaluate(testbed, test_images, test_kinds, present=test_present)
    metrics = {
        "model": "transformers LlavaForConditionalGeneration (CLIP vision tower = testbed ViT, Llama)",
        "text_config": TEXT_CONFIG, "vision_feature_layer": -2, "image_tokens": IMAGE_TOKENS,
        "mean": MEAN, "std": STD, "vocab_size": tok.get_vocab_size(), "vision_tower": str(vit_path.name),
        "vision_tower_frozen": True, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "warmup": warmup, "max_qa_per_image": max_qa, "caption_share": caption_share,
        "caption_prompt": CAPTION_PROMPT, "caption_form": CAPTION_FORM, "train_size": train_size,
        "val_size": val_size, "test_size": test_size, "pope_stats_scenes": STATS_SCENES,
        "init": str(init) if init is not None else None, "earlier_stage": earlier,
        "val": val, "test": test, "history": history,
        "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "torch": torch.__version__, "command": " ".join(["python3", *sys.argv]),
    }
    save_file(weights, str(out_dir / "vlm.safetensors"))
    tok.save(str(out_dir / "vlm_tokenizer.json"))
    (out_dir / "vlm.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"test POPE random accuracy {test['random']['accuracy']:.4f}, caption CHAIR_i "
          f"{test['caption']['chair_i']:.4f} (recall {test['caption']['recall']:.4f}); "
          f"wrote {out_dir / 'vlm.safetensors'}",
          flush=True)
    return metrics
