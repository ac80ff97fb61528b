"""``visattn eval vlm`` on a user's Hugging Face checkpoint and POPE question files (visattn/testbed/hf_vlm.py).

The checkpoint is the tiny random-weight LLaVA of tests/tiny_vlms.py saved with ``save_pretrained``,
beside a processor built from configs (a word-level tokenizer made with ``tokenizers`` and a
``CLIPImageProcessor``), so nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from visattn.cli import main
from visattn.testbed.eval import eval_vlm
from visattn.testbed.hf_vlm import pope_answer, read_pope, short_answer

transformers = pytest.importorskip("transformers")
from tiny_vlms import IMAGE, PAD, VOCAB, build  # noqa: E402

WORDS = ["is", "there", "a", "circle", "square", "star", "in", "the", "image", "?", ".", "answer", "question",
         "using", "single", "word", "or", "phrase", "describe", "one", "sentence", "yes", "no", "user", ":",
         "assistant"]
CHAT_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                 "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
QUESTIONS = [("a.png", "Is there a circle in the image?", "yes"), ("a.png", "Is there a star in the image?", "no"),
             ("b.png", "Is there a square in the image?", "yes"), ("c.png", "Is there a circle in the image?", "no"),
             ("c.png", "Is there a star in the image?", "yes")]


def _processor(chat_template: str | None) -> object:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    names = {PAD: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>", IMAGE: "<image>"}
    rest = iter(WORDS + [f"w{i}" for i in range(VOCAB)])
    vocab = {names[i] if i in names else next(rest): i for i in range(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(list(names.values()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return transformers.LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=14,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=chat_template)


def _save(path, chat_template: str | None = CHAT_TEMPLATE):
    """The tiny LLaVA and its processor, saved into ``path`` (a dotted name, as real checkpoints have)."""
    model = build("llava", "sdpa")
    model.generation_config.suppress_tokens = [IMAGE]  # a random model would emit image tokens
    model.save_pretrained(path)
    _processor(chat_template).save_pretrained(path)
    return path


def _pope(tmp_path, flip: bool = False, name: str = "pope_random"):
    """The five QUESTIONS as a POPE file (labels flipped if ``flip``) over three generated images."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for file in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / file)
    lines = [{"question_id": i, "image": img, "text": q, "label": {"yes": "no", "no": "yes"}[a] if flip else a}
             for i, (img, q, a) in enumerate(QUESTIONS)]
    file = tmp_path / f"{name}.jsonl"
    file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return file, images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("tiny_llava") / "llava-tiny-1.5")


def test_pope_answers_are_read_as_pope_reads_them():
    assert [pope_answer(t) for t in ("Yes", "No", "No, there is not.", "There is not a star.", "Yes. No star.",
                                     "I see no star", "Nothing")] == ["yes", "no", "no", "no", "yes", "no", "yes"]
    assert [short_answer(t) for t in ("Red.", "2 circles", " The circle", "", "12")] == ["red", "two", "the", "", "12"]


def test_pope_file_accuracy_is_measured_against_its_labels(checkpoint, tmp_path):
    """The same questions with flipped labels: the same answers, so accuracies add to 1, yes-ratios agree."""
    file, images = _pope(tmp_path)
    flipped, _ = _pope(tmp_path, flip=True, name="pope_flipped")
    result = eval_vlm("prune", sweep=("keep", [1.0]), n=None, device="cpu", checkpoint=checkpoint,
                      questions=[file, flipped], images=images, out_dir=tmp_path / "out", progress=False)
    stock = result["stock"]
    assert set(stock) == {"pope_random", "pope_flipped"} and result["questions"] == {"pope_random": 5,
                                                                                       "pope_flipped": 5}
    assert stock["pope_random"]["accuracy"] + stock["pope_flipped"]["accuracy"] == pytest.approx(1.0)
    assert stock["pope_random"]["yes_ratio"] == stock["pope_flipped"]["yes_ratio"]
    assert result["images"] == 3 and result["model"].startswith("LlavaForConditionalGeneration")
    row = result["rows"][0]
    assert row["agreement"] == 1.0 and row["metrics"] == stock and row["caption_agreement"] is None
    assert (tmp_path / "out" / f"eval_vlm_{checkpoint.name}_prune.png").is_file()


def test_cli_runs_a_checkpoint_without_chat_template_on_the_first_questions(tmp_path, capsys):
    ckpt = _save(tmp_path / "plain", chat_template=None)
    file, images = _pope(tmp_path)
    assert main(["eval", "vlm", "--method", "inspect", "--checkpoint", str(ckpt), "--questions", str(file),
                 "--images", str(images), "--n", "2", "--device", "cpu", "--out-dir", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| setting | POPE acc pope_random | POPE F1 pope_random | agreement with stock |" in out
    assert "| inspect defaults |" in out
    result = json.loads((tmp_path / "out" / "eval_vlm_plain_inspect.json").read_text())
    assert result["questions"] == {"pope_random": 2} and result["rows"][0]["agreement"] == 1.0


def test_checkpoint_on_generated_scenes_gets_chair(checkpoint):
    result = eval_vlm("prune", {"keep": 1.0}, n=1, device="cpu", checkpoint=checkpoint, out_dir=None, progress=False,
                      batch_size=64)
    assert set(result["stock"]) == {"random", "popular", "adversarial", "colour", "count", "caption"}
    assert len(result["stock_captions"]) == 1 and result["rows"][0]["caption_agreement"] == 1.0


def test_bad_question_files_and_checkpoints_are_named(checkpoint, tmp_path):
    file, images = _pope(tmp_path)
    with pytest.raises(ValueError, match="give both --questions and --images"):
        eval_vlm("inspect", checkpoint=checkpoint, questions=file, out_dir=None)
    with pytest.raises(ValueError, match="question files need a Hugging Face checkpoint directory"):
        eval_vlm("inspect", checkpoint=tmp_path / "vlm.safetensors", questions=file, images=images, out_dir=None)
    with pytest.raises(FileNotFoundError, match="question file .*missing.jsonl does not exist"):
        eval_vlm("inspect", checkpoint=checkpoint, questions=tmp_path / "missing.jsonl", images=images, out_dir=None)
    with pytest.raises(FileNotFoundError, match="image folder .* does not exist"):
        read_pope([file], tmp_path / "nowhere")
    cases = {'{"image": "a.png", "text": "Is there a star?", "label": "maybe"}': "label must be one of yes, no",
             '{"image": "a.png", "question": "Is there a star?", "label": "no"}': "keys image, text, label",
             '["a.png", "Is there a star?", "no"]': "keys image, text, label",
             'image=a.png': "not JSON",
             '{"image": "z.png", "text": "Is there a star?", "label": "no"}': "image .*z.png does not exist"}
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(file.read_text() + line + "\n")
        with pytest.raises((ValueError, FileNotFoundError), match=f"bad.jsonl:6: .*{message}"):
            read_pope([bad], images)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face checkpoint directory"):
        eval_vlm("inspect", checkpoint=tmp_path, questions=file, images=images, out_dir=None)
    with pytest.raises(ValueError, match="--tokenizer is for a testbed"):
        eval_vlm("inspect", checkpoint=checkpoint, tokenizer=tmp_path / "t.json", out_dir=None)
