"""The tiny model: builds deterministically, reloads with transformers, tokenizes as promised."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from cir_actors.config import TinyModelConfig
from cir_actors.data.loaders import CIR_INSTRUCTION
from cir_actors.data.tiny_model import FENCE_TOKENS, IM_END, IM_START, build_tiny_model, model_dir_name

ROUND_TRIP_TEXTS = [
    "```python\nprint(48213 * 937)\n```",
    "\n```output\n45175581\n```\n",
    "\n```output\nNameError: name 'y' is not defined\n```\n",
    "The answer is $\\boxed{45175581}$.",
    "\\boxed{\\frac{1}{2}} and \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
    "def f(n):\n    return n * n + 1\n\n\nprint(sum(f(i) for i in range(10)))\n",
    "  leading spaces,\ttabs,\r\nCRLF and trailing spaces   ",
    "````four backticks```` and ``` inline```python",
    "unicode: café, π ≈ 3.14159, 你好, emoji 🙂",
    CIR_INSTRUCTION,
    "1234567890 0.000123 -98765",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_autotokenizer_matches_trained_tokenizer(tiny_model_dir, tok):
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    for text in ROUND_TRIP_TEXTS + [f"{IM_START}user\nhi{IM_END}\n"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text, text


def test_digits_are_one_token_each(tok):
    number = "9081726354" * 3
    ids = tok.encode(number, add_special_tokens=False)
    assert len(ids) == len(number)
    assert [tok.decode([i]) for i in ids] == list(number)
    assert len({tok.convert_tokens_to_ids(d) for d in "0123456789"}) == 10


def test_fences_and_special_tokens_are_single_tokens(tok):
    for text in FENCE_TOKENS + (IM_START, IM_END):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids) == text, text
    # The close of a code block never merges with the newline that follows it.
    ids = tok.encode("x)\n```\n```output\n", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("```") in ids and tok.convert_tokens_to_ids("```output") in ids
    assert tok.eos_token == IM_END and tok.pad_token == "<|endoftext|>"


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == f"{IM_START}user\nWhat is 2+3?{IM_END}\n{IM_START}assistant\n"


def test_model_reloads_untied_and_generates(tiny_model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    info = json.loads((tiny_model_dir / "build_info.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"]
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size >= len(tok)
    ids = tok("What is 12 times 34?", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_build_is_deterministic_and_reused(tmp_path):
    cfg = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32,
                          vocab_size=320, max_position_embeddings=128, seed=3)
    a = build_tiny_model(cfg, tmp_path / "a")
    b = build_tiny_model(cfg, tmp_path / "b")
    assert a.name == b.name == model_dir_name(cfg)
    for name in ("tokenizer.json", "model.safetensors", "config.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(cfg, tmp_path / "a") == a  # reused, not rebuilt
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp dir left
    umask = os.umask(0o022)
    os.umask(umask)  # readable by whoever the umask lets read (another user's Ray workers), not 0700
    assert {p.name: p.stat().st_mode & 0o777 for p in (a, *a.iterdir())} == {
        p.name: (0o777 if p.is_dir() else 0o666) & ~umask for p in (a, *a.iterdir())}
    other = build_tiny_model(cfg.model_copy(update={"seed": 4}), tmp_path / "a")
    assert other != a and (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_build_model_entrypoint(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "entrypoints"))
    try:
        import build_model
    finally:
        sys.path.pop(0)
    small = ["model.tiny.hidden_size=16", "model.tiny.num_layers=1", "model.tiny.intermediate_size=32",
             "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.vocab_size=320"]
    assert build_model.main(["--out", str(tmp_path), *small]) == 0
    built = Path(capsys.readouterr().out.strip())
    assert built.parent == tmp_path and (built / "model.safetensors").is_file()
    assert build_model.main(["--out", str(tmp_path), "model.tiny.hidden_sise=16"]) == 2
    assert "unknown key 'model.tiny.hidden_sise'" in capsys.readouterr().err
