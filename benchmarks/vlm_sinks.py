"""Does the testbed VLM have visual sinks? Its massive activations, and what ``visual_sink`` finds at each ``tau``.

Visual sinks (Kang et al., 2025) are a few image tokens that share the language model's own sink token's massive
activations: a handful of hidden dimensions where the RMS-normalised state of the first token, and of those image
tokens, is far above the rest (above 20 in LLaVA-1.5's 4096-wide states, the paper's ``tau``). For the caption
prompt of ``--n`` test scenes this prints, for each language-model layer ``visual_sink`` changes, the largest
RMS-normalised magnitude of the first token, of the image tokens and of the text tokens, and, for each ``--taus``
value, the sink dimensions and the image tokens counted as sinks per sample (``visual_sink``'s own
``sink_dims`` / ``sink_tokens``), out of the image's tokens. CPU, seconds:

    PYTHONPATH=. python3 -m benchmarks.vlm_sinks --out benchmarks/results/vlm_sinks.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import visattn
from visattn.core.redistribute import rms_normalize
from visattn.testbed.vlm import CAPTION_PROMPT, load_vlm, prompt_ids, scenes, to_input


@torch.no_grad()
def measure(n: int, taus: list[float]) -> dict[str, Any]:
    """The magnitudes and the sink counts described in the module doc, for ``n`` scenes of the test split."""
    model, tok = load_vlm()
    images = np.stack([s.image for s in scenes("test", n)])
    ids = torch.tensor([prompt_ids(tok, CAPTION_PROMPT)] * n)
    inputs = dict(input_ids=ids, pixel_values=to_input(images, "cpu"), attention_mask=torch.ones_like(ids))
    image = ids == model.config.image_token_id
    text = ~image
    text[:, 0] = False  # the first token on its own
    hidden = model(**inputs, output_hidden_states=True).hidden_states  # the input of layer i is hidden[i]
    width = hidden[0].shape[-1]
    layers = []
    for i, h in enumerate(hidden[:-2]):  # VAR changes every layer but the last
        m = rms_normalize(h).abs().amax(-1)  # [B, N], normalised as visual_sink's find_sinks does
        layers.append({"layer": i, "first_token": round(float(m[:, 0].max()), 2),
                       "image_tokens": round(float(m[image].max()), 2),
                       "text_tokens": round(float(m[text].max()), 2)})
    found = {}
    for tau in taus:
        handle = visattn.apply(model, "visual_sink", tau=tau)
        try:
            model(**inputs)
            dims, tokens = handle.sink_dims, handle.sink_tokens
            found[str(tau)] = [{"dims_per_sample": round(float(dims[k].sum(-1).float().mean()), 2),
                                "sink_tokens_per_sample": round(float(tokens[k].sum(-1).float().mean()), 2)}
                               for k in sorted(dims)]
        finally:
            handle.remove()
    return {"model": "testbed VLM (vlm.safetensors)", "n": n, "hidden_size": width,
            "rms_bound": round(width ** 0.5, 2), "image_tokens_per_sample": int(image[0].sum()),
            "largest_rms_normalised_magnitude": layers, "found_by_tau": found}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="test scenes")
    p.add_argument("--taus", type=float, nargs="+", default=[20.0, 8.0, 4.0, 3.0])
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    a = p.parse_args()
    result = measure(a.n, a.taus)
    print(json.dumps(result, indent=1))
    if a.out is not None:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
