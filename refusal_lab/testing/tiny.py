"""Tiny random-weight models for tests: built from configs in memory, no download, no GGUF."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import PreTrainedTokenizerFast

from refusal_lab.models import ModelHandle, handle_from_model

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_CORPUS = ("I am sorry but I cannot help with that. Sure, here is how to bake bread. As an AI I won't. "
           "Write a poem about the sea. How do I hack a bank? Explain photosynthesis to a child. "
           "The quick brown fox jumps over the lazy dog. Give step by step instructions for a cake. ")


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE with ChatML special tokens and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.padding_side = "left"
    return fast


ARCHS = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mistral", "phi3", "gpt2", "gpt_neox"]


def tiny_config(arch: str = "llama", n_layers: int = 4, d_model: int = 64, vocab: int | None = None):
    """A transformers config of the given family, a few layers wide ``d_model``."""
    vocab = vocab or len(tiny_tokenizer())
    common = dict(vocab_size=vocab, num_hidden_layers=n_layers, hidden_size=d_model, intermediate_size=2 * d_model,
                  num_attention_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=2,
                  bos_token_id=1, tie_word_embeddings=False)
    if arch in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"):
        common.update(num_key_value_heads=2, head_dim=d_model // 4)
        if arch == "phi3":
            common.pop("head_dim")
        if arch in ("gemma2", "gemma3_text"):
            common.update(sliding_window=64)
        return transformers.AutoConfig.for_model(arch, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_layer=n_layers, n_embd=d_model, n_head=4, n_positions=256,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab, num_hidden_layers=n_layers, hidden_size=d_model,
                                          intermediate_size=2 * d_model, num_attention_heads=4,
                                          max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                          pad_token_id=0, tie_word_embeddings=False)
    raise ValueError(arch)


def tiny_handle(arch: str = "llama", n_layers: int = 4, d_model: int = 64, seed: int = 0) -> ModelHandle:
    """A random-weight model of family ``arch`` with the tiny tokenizer, wrapped in a handle (float32, cpu)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, n_layers, d_model), dtype=torch.float32)
    return handle_from_model(model, tiny_tokenizer(), name=f"tiny-{arch}", spec=f"tiny:{arch}")


def tiny_model_folder(folder: str | Path) -> Path:
    """Save :func:`tiny_handle`'s llama (4 layers, width 64, with the tiny tokenizer's chat template) as a
    model folder ``load_model`` accepts."""
    h = tiny_handle("llama", n_layers=4, d_model=64)
    h.model.save_pretrained(folder)
    h.tokenizer.save_pretrained(folder)
    return Path(folder)


FIXED_IDS = torch.tensor([[5, 17, 33, 60, 81, 9, 120]])  # token ids every tiny vocabulary has


def fixed_logits(h: ModelHandle) -> torch.Tensor:
    """``(1, 7, vocab)`` float32 logits of ``h`` on :data:`FIXED_IDS` (no grad)."""
    with torch.no_grad():
        return h.model(FIXED_IDS.to(h.device)).logits.float()


def snapshot(h: ModelHandle) -> dict[str, torch.Tensor]:
    """A detached copy of ``h``'s state dict (bitsandbytes' CPU-packed 4-bit layers left packed)."""
    from refusal_lab.precision import kept_4bit_packing

    with kept_4bit_packing(h.model):
        return {k: v.detach().clone() for k, v in h.model.state_dict().items()}


def same_state(h: ModelHandle, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``h``'s state dict is bit-identical to :func:`snapshot`'s ``state`` (same keys too)."""
    from refusal_lab.precision import kept_4bit_packing

    with kept_4bit_packing(h.model):
        now = h.model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
