"""The locally built tiny model: a byte-level BPE tokenizer and a random-init Qwen2 causal LM.

There is no model hub here and CI must not need one, so `build_tiny_model` makes, deterministically
from `TinyModelConfig.seed`, a Hugging Face model directory (safetensors, tokenizer files, chat
template, generation config) that loads with AutoTokenizer / AutoModelForCausalLM and in vLLM.

Tokenizer choices, and why:
- The pipeline (NFC, Qwen2's regex split, byte-level) is exactly the one transformers rebuilds a
  Qwen2 tokenizer with on reload, so the ids we train are the ids AutoTokenizer and vLLM produce.
  Qwen2's split isolates every digit, so digits are one token each (the model copies numbers
  digit by digit).
- The code fences "```python", "```output" and "```" are added tokens: one id each, never merged
  with a neighbouring newline, so the close of a code block is one token a generator can stop on.
- Chat template in Qwen's ChatML form; "<|im_end|>" ends a turn and is the eos token.
The model has untied embeddings (vLLM's CPU backend does not reload a tied lm_head in place).
This module does not train anything: the weights are random.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from cir_actors.config import TinyModelConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = PROJECT_ROOT / ".cache" / "models"

# Bump when the tokenizer pipeline or the saved layout changes. With the config and a digest of the
# tokenizer corpus it makes the directory name, so an old cached build is never mistaken for a new
# one (the corpus is built from data/tasks.py and the interpreter's output format, which may change).
BUILD_VERSION = "1"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
FENCE_TOKENS = ("```python", "```output", "```")

# Qwen2's pre-tokenizer split (transformers/models/qwen2/tokenization_qwen2.py).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def model_dir_name(cfg: TinyModelConfig, corpus: list[str] | None = None) -> str:
    """`tiny-<hash>`: a function of every config field, the build version and the tokenizer corpus."""
    corpus = tokenizer_corpus(cfg.seed) if corpus is None else corpus
    digest = hashlib.sha256("\x00".join(corpus).encode()).hexdigest()
    key = json.dumps({"cfg": cfg.model_dump(), "build": BUILD_VERSION, "corpus": digest}, sort_keys=True)
    return "tiny-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def build_tiny_model(cfg: TinyModelConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """Build (or reuse) the tiny model and return its directory `<cache_dir>/tiny-<hash of cfg>`.

    The build goes to a temporary directory that is renamed into place at the end, so a half-written
    directory is never reused, and concurrent builders of the same config agree on one result.
    """
    cfg = cfg or TinyModelConfig()
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    if not cache.is_absolute():
        cache = PROJECT_ROOT / cache
    t0 = time.perf_counter()
    corpus = tokenizer_corpus(cfg.seed)
    final = cache / model_dir_name(cfg, corpus)
    if (final / "config.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    try:
        tokenizer = _train_tokenizer(cfg, corpus)
        _save_tokenizer(tokenizer, tmp, cfg)
        num_params = _save_model(tmp, cfg, tokenizer)
        (tmp / "build_info.json").write_text(
            json.dumps(
                {
                    "tiny_model_config": cfg.model_dump(),
                    "build_version": BUILD_VERSION,
                    "num_parameters": num_params,
                    "tokenizer_size": tokenizer.get_vocab_size(with_added_tokens=True),
                    "build_seconds": round(time.perf_counter() - t0, 2),
                },
                indent=2,
            )
        )
        umask = os.umask(0o022)
        os.umask(umask)
        for made in (tmp, *tmp.iterdir()):  # mkdtemp's (and a temporary file's) 0700 / 0600 -> the umask's
            made.chmod((0o777 if made.is_dir() else 0o666) & ~umask)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------- corpus


def tokenizer_corpus(seed: int, num_docs: int = 3000) -> list[str]:
    """Text the project generates: the CIR instruction, chat-formatted problems, CIR-style
    responses with code and output fences, arithmetic, Python snippets and LaTeX answers."""
    from cir_actors.data.loaders import CIR_INSTRUCTION
    from cir_actors.data.tasks import demonstration_segments, generate_problems

    rng = random.Random(seed)
    docs: list[str] = []
    for prob in generate_problems(num_docs, seed=seed, split="train"):
        # The gold is what the code prints (tests check it); running 3000 snippets would cost seconds.
        response = "".join(text for text, _ in demonstration_segments(prob, stdout=prob.gold))
        docs.append(
            f"{IM_START}user\n{CIR_INSTRUCTION}\n\n{prob.problem}{IM_END}\n{IM_START}assistant\n{response}{IM_END}\n"
        )
    snippets = [
        "import math\nprint(math.gcd({a}, {b}))",
        "x = {a}\ny = {b}\nprint(x * y + {c})",
        "def f(n):\n    return n * n + {a}\n\nprint(sum(f(i) for i in range({b})))",
        "result = [i for i in range({a}) if i % {c} == 0]\nprint(len(result))",
        "from sympy import symbols, solve\nx = symbols('x')\nprint(solve(x**2 - {a}, x))",
        "total = 0\nfor k in range(1, {b}):\n    total += k ** 2\nprint(total)",
        "print(pow({a}, {b}, {c}))",
        "Traceback (most recent call last):\nNameError: name 'y' is not defined",
    ]
    latex = [
        "\\frac{{{a}}}{{{b}}}",
        "\\sqrt{{{a}}}",
        "{a}^{{{c}}}",
        "\\left( {a}, \\frac{{\\pi}}{{{c}}} \\right)",
        "x^2 + {b}x - {c} = 0",
    ]
    for _ in range(num_docs // 2):
        vals = {"a": rng.randint(2, 9999), "b": rng.randint(2, 999), "c": rng.randint(2, 97)}
        docs.append(rng.choice(snippets).format(**vals))
        docs.append(f"We have ${rng.choice(latex).format(**vals)}$, so the answer is $\\boxed{{{vals['a']}}}$.")
    return docs


# ------------------------------------------------------------------------------------- tokenizer


def _train_tokenizer(cfg: TinyModelConfig, corpus: list[str]):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size - len(FENCE_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FENCE_TOKENS])
    return tok


def _save_tokenizer(tok, out: Path, cfg: TinyModelConfig) -> None:
    tok.save(str(out / "tokenizer.json"))
    model = json.loads(tok.to_str())["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + FENCE_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "extra_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "model_max_length": cfg.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": IM_END, "pad_token": ENDOFTEXT, "extra_special_tokens": [IM_START, IM_END]})
    )


# ----------------------------------------------------------------------------------------- model


def _save_model(out: Path, cfg: TinyModelConfig, tok) -> int:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos_id, pad_id = tok.token_to_id(IM_END), tok.token_to_id(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_sliding_window=False,
        dtype="float32",
    )
    # Seed just around the init; restore the caller's RNG so building a model has no side effect.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=[eos_id, tok.token_to_id(ENDOFTEXT)], pad_token_id=pad_id).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())
