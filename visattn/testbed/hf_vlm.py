"""Real vision-language checkpoints and POPE question files for ``visattn eval vlm``.

A user with a model and data of their own passes a local Hugging Face checkpoint directory (what
``save_pretrained`` writes, with its processor: ``AutoProcessor`` + ``AutoModelForImageTextToText``,
e.g. LLaVA, LLaVA-NeXT, Qwen2-VL) and, optionally, POPE question files in the format of the POPE
repository (``output/coco/coco_pope_random.json``: one JSON object a line,
``{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the
image?", "label": "yes"}``) with the folder holding the images.

:class:`HFVLM` answers and captions with greedy ``generate()`` on prompts built with the processor's
chat template (a user turn holding the image and the text) when it has one, else ``<image>\\n<text>``
with the processor's image token. Questions get LLaVA-1.5's short-answer instruction
(:data:`ANSWER_INSTRUCTION`); a yes/no answer is read as POPE's own evaluation reads it
(:func:`pope_answer`), any other as its first word (:func:`short_answer`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import NUMBER_WORDS

#: appended to every question, as LLaVA-1.5's evaluation scripts do for POPE and short-answer QA.
ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
#: the prompt that asks a real model for a caption (scored with CHAIR on the generated scenes).
CAPTION_INSTRUCTION = "Describe the image in one sentence."
ANSWER_TOKENS = 10
POPE_KEYS: tuple[str, ...] = ("image", "text", "label")
POPE_LABELS: tuple[str, ...] = ("yes", "no")


def pope_answer(text: str) -> str:
    """``yes`` or ``no`` as POPE's evaluation reads an answer: its first sentence, without commas, is
    ``no`` when it holds the word ``no``, ``No`` or ``not``, else ``yes``."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def short_answer(text: str) -> str:
    """The first word of an answer, lower-cased, without punctuation; a digit becomes its number word."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if not words:
        return ""
    word = words[0]
    return NUMBER_WORDS[int(word)] if word.isdigit() and int(word) < len(NUMBER_WORDS) else word


def read_pope(files: Sequence[str | Path], images: str | Path, n: int | None = None
              ) -> tuple[list[Path], dict[str, list[tuple[int, str, str]]]]:
    """The image files and, per question file (named by its stem), the ``(image index, question, label)``
    triples of its first ``n`` questions (all if None). Every line, key, label and image is checked first."""
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (--images: the folder holding the POPE images)")
    if not files:
        raise ValueError("no question file given")
    paths: dict[str, int] = {}
    kinds: dict[str, list[tuple[int, str, str]]] = {}
    for file in map(Path, files):
        if not file.is_file():
            raise FileNotFoundError(f"question file {file} does not exist")
        if file.stem in kinds:
            raise ValueError(f"two question files are named {file.stem}; each file's stem names its split")
        triples = []
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file}:{number}: not JSON ({exc.msg}); expected one object a line with keys "
                                 f"{', '.join(POPE_KEYS)}, as in the POPE repository") from exc
            if not isinstance(item, dict) or not set(POPE_KEYS) <= set(item):
                got = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise ValueError(f"{file}:{number}: expected an object with keys {', '.join(POPE_KEYS)} (got {got})")
            label = str(item["label"]).strip().lower()
            if label not in POPE_LABELS:
                raise ValueError(f"{file}:{number}: label must be one of {', '.join(POPE_LABELS)} "
                                 f"(got {item['label']!r})")
            image = root / str(item["image"])
            if not image.is_file():
                raise FileNotFoundError(f"{file}:{number}: image {image} does not exist")
            index = paths.setdefault(str(image), len(paths))
            triples.append((index, str(item["text"]), label))
            if n is not None and len(triples) == n:
                break
        if not triples:
            raise ValueError(f"{file} holds no questions")
        kinds[file.stem] = triples
    return [Path(p) for p in paths], kinds


class HFVLM:
    """A local Hugging Face image-text-to-text checkpoint and its processor (float32 on the CPU, the
    checkpoint's own dtype on a GPU; sdpa attention), answering and captioning greedily."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json); "
                                    "--checkpoint takes such a directory or a testbed vlm.safetensors")
        try:
            self.processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{path} holds no processor that AutoProcessor can load; save the model's "
                                    f"processor beside it (processor.save_pretrained): {exc}") from exc
        if not hasattr(self.processor, "image_processor"):
            raise ValueError(f"the processor in {path} takes no images ({type(self.processor).__name__})")
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        dtype = "auto" if device.type == "cuda" else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype,
                                                                 attn_implementation="sdpa").to(device).eval()
        self.device = device
        self.description = f"{type(self.model).__name__} ({path})"

    def _prompt(self, text: str) -> str:
        if getattr(self.processor, "chat_template", None):
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(turn, add_generation_prompt=True)
        return f"{getattr(self.processor, 'image_token', '<image>')}\n{text}"

    @torch.no_grad()
    def _generate(self, images: Sequence[np.ndarray | Path], texts: Sequence[str], batch_size: int,
                  max_new_tokens: int, on_batch: Any) -> list[str]:
        out: list[str] = []
        for a in range(0, len(texts), batch_size):
            pics = [Image.open(p).convert("RGB") if isinstance(p, Path) else Image.fromarray(p)
                    for p in images[a:a + batch_size]]
            inputs = self.processor(images=pics, text=[self._prompt(t) for t in texts[a:a + batch_size]],
                                    padding=True, return_tensors="pt").to(self.device)
            new = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            out += [t.strip() for t in self.processor.batch_decode(new[:, inputs["input_ids"].shape[1]:],
                                                                   skip_special_tokens=True)]
            if on_batch is not None:
                on_batch(len(pics))
        return out

    def answer(self, images: Sequence[np.ndarray | Path], questions: Sequence[str], batch_size: int = 8,
               on_batch: Any = None, yes_no: bool = False) -> list[str]:
        """The answer to ``questions[i]`` about ``images[i]``: :func:`pope_answer` of it if ``yes_no``,
        else :func:`short_answer`."""
        texts = self._generate(images, [f"{q} {ANSWER_INSTRUCTION}" for q in questions], batch_size,
                               ANSWER_TOKENS, on_batch)
        return [pope_answer(t) if yes_no else short_answer(t) for t in texts]

    def caption(self, images: Sequence[np.ndarray | Path], batch_size: int = 8, on_batch: Any = None,
                max_new_tokens: int = 24) -> list[str]:
        """A caption of each image: the first sentence generated after :data:`CAPTION_INSTRUCTION`."""
        texts = self._generate(images, [CAPTION_INSTRUCTION] * len(images), batch_size, max_new_tokens, on_batch)
        return [t.split(".")[0] + "." for t in texts]
