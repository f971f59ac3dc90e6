"""Model loading and architecture discovery."""

import pytest
import torch

from refusal_lab.models import (ChatTemplateError, ModelLoadError, handle_from_model, linear_out_features, load_model,
                         resolve_spec, weight_as_out_in)
from refusal_lab.testing.tiny import ARCHS, tiny_handle, tiny_tokenizer


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_discovery(arch):
    h = tiny_handle(arch, n_layers=3, d_model=64)
    assert h.n_layers == 3 and h.d_model == 64
    for layer in range(h.n_layers):
        w = h.writers(layer)
        assert set(w) == {"attn", "mlp"}
        for mod in w.values():
            assert linear_out_features(mod) == 64
            assert weight_as_out_in(mod).shape[0] == 64
    assert h.embedding.weight.shape[1] == 64
    assert h.final_norm is not None
    # the writers really write the residual: zeroing them makes every block the identity on the residual
    ids = torch.tensor([[5, 6, 7, 8]])
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).clone()),
                                         with_kwargs=True) for b in h.blocks]
    try:
        with torch.no_grad():
            for layer in range(h.n_layers):
                for mod in h.writers(layer).values():
                    mod.weight.zero_()
                    if getattr(mod, "bias", None) is not None:
                        mod.bias.zero_()
            h.model(ids)
    finally:
        for hk in hooks:
            hk.remove()
    for a, b in zip(seen, seen[1:]):
        assert torch.allclose(a, b, atol=1e-6), arch


def test_post_instruction_suffix_from_template():
    h = tiny_handle("llama")
    assert h.post_instruction_suffix() == "<|im_end|>\n<|im_start|>assistant\n"
    assert h.format("Hi").endswith("Hi<|im_end|>\n<|im_start|>assistant\n")


def test_missing_chat_template_is_a_clear_error():
    h = tiny_handle("llama")
    tok = tiny_tokenizer()
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(ChatTemplateError, match="chat_template"):
            h.format("Hi")
        h.chat_template = saved  # passing one explicitly fixes it
        assert "Hi" in h.format("Hi")
    finally:
        tok.chat_template = saved


def test_local_folder_roundtrip_and_fingerprint(tmp_path):
    h = tiny_handle("qwen2", n_layers=2)
    h.model.save_pretrained(tmp_path / "m")
    h.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert loaded.n_layers == 2 and loaded.name == "m" and loaded.source_dir == (tmp_path / "m").resolve()
    assert loaded.fingerprint == load_model(str(tmp_path / "m")).fingerprint
    ids = torch.tensor([[3, 4, 5]])
    assert torch.allclose(loaded.model(ids).logits, h.model(ids).logits, atol=1e-5)
    assert loaded.tokenizer.padding_side == "left"


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_spec(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_spec(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="not a model spec"):
        resolve_spec("no spaces allowed here")


def test_trust_remote_code_is_off_by_default():
    import inspect

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False


def test_in_memory_fingerprint_tracks_weights():
    h1, h2 = tiny_handle("llama", seed=0), tiny_handle("llama", seed=0)
    assert h1.fingerprint == h2.fingerprint
    assert tiny_handle("llama", seed=1).fingerprint != h1.fingerprint


@pytest.mark.slow
def test_default_model_info_cli():
    """The acceptance check: `python -m refusal_lab info --model default` prints 30 layers, width 576."""
    import subprocess
    import sys
    import time

    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "refusal_lab", "info", "--model", "default"], capture_output=True,
                         text=True, timeout=300, cwd=str(__import__("conftest").ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "n_layers: 30" in out.stdout and "d_model: 576" in out.stdout
    assert "<|im_start|>assistant" in out.stdout
    assert time.time() - t0 < 120


def test_linear_kind_answers_what_kind_of_linear_layer_a_module_is():
    from transformers.pytorch_utils import Conv1D

    from refusal_lab.models import is_plain_linear, linear_kind

    class Quantized(torch.nn.Linear):  # as bitsandbytes' Linear4bit / Linear8bitLt are
        pass

    class HQQLinear(torch.nn.Module):  # HQQ's layer is no nn.Linear, but is one
        pass

    kinds = {linear_kind(m): is_plain_linear(m) for m in (torch.nn.Linear(4, 3), Conv1D(3, 4), Quantized(4, 3),
                                                           HQQLinear(), torch.nn.Embedding(5, 4))}
    assert kinds == {"dense": True, "conv1d": True, "quantized": False, None: False}


def test_a_conversion_finished_by_another_process_is_kept_and_ours_dropped(tmp_path):
    """Sweep tasks starting on a new node convert the default model at once: each builds in its own
    scratch folder, and the first finished copy wins."""
    from refusal_lab.models import _publish, _scratch

    out = tmp_path / "models" / "m"
    first, second = _scratch(out), _scratch(out)
    assert first != second
    for tmp, text in ((first, "first"), (second, "second")):
        tmp.mkdir(parents=True)
        (tmp / "refusal_lab.json").write_text(text)
    assert _publish(first, out) == out and _publish(second, out) == out
    assert (out / "refusal_lab.json").read_text() == "first" and not first.exists() and not second.exists()
    leftover = _scratch(out)
    leftover.mkdir()
    (leftover / "refusal_lab.json").write_text("third")
    import shutil
    shutil.rmtree(out)
    out.mkdir()  # an unfinished folder (no marker) is replaced
    assert (_publish(leftover, out) / "refusal_lab.json").read_text() == "third"
