"""Models spread by accelerate (issue 24, part 2), without a GPU: a tiny model with some modules on the CPU and
some offloaded to disk (``load_model(device_map=…)``), fully offloaded to CPU memory (``cpu_offload``) or to
disk (``disk_offload``). Every hook, intervention, weight edit, AIRD mode, compression and the direction
extraction must give the numbers of the same model loaded whole, leave no hook behind and put every
offloaded weight back."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from refusal_lab.activations import BatchRunner, mean_activations, tokenize
from refusal_lab.aird.repair import Repair, applied, merge
from refusal_lab.cli import main
from refusal_lab.compression import apply
from refusal_lab.directions import generate_candidates
from refusal_lab.evaluation import perplexity
from refusal_lab.generation import greedy_ids
from refusal_lab.interventions import INTERVENTIONS, add_rank1, count_hooks, intervene, scale_writers
from refusal_lab.models import ModelHandle, ModelLoadError, load_model, tensors_fingerprint
from refusal_lab.placement import (module_device, offload_hook, parse_device_map, parse_max_memory,
                                   read_tensor)
from refusal_lab.study_spec import StudySpec
from refusal_lab.testing.tiny import tiny_handle

DEVICE_MAP = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "disk",
              "lm_head": "disk"}
PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis to a child.",
           "Give step by step instructions for a cake."]
KINDS = ("device_map", "cpu_offload", "disk_offload")
EXACT = dict(rtol=0.0, atol=1e-6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Offloaded forwards re-materialise every weight; on two busy cores torch's thread pool then spends
    ten times longer waiting than computing (tiny matrices): one thread keeps this file at seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny llama saved as a safetensors folder, and a private cache (offload folders land there)."""
    root = tmp_path_factory.mktemp("offload")
    h = tiny_handle("llama", n_layers=4, d_model=64)
    h.model.save_pretrained(root / "tiny")
    h.tokenizer.save_pretrained(root / "tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_LAB_CACHE", str(root / "cache"))
        yield root


@pytest.fixture(scope="module")
def ref(root) -> ModelHandle:
    return load_model(str(root / "tiny"), precision="float32")


def _offloaded(kind: str, root: Path) -> ModelHandle:
    """The tiny model placed by ``kind`` (:data:`KINDS`); ``meta["on_disk"]``: some weights are on disk."""
    if kind == "device_map":
        h = load_model(str(root / "tiny"), device_map=DEVICE_MAP, offload_folder=root / "off", precision="float32")
    else:
        from accelerate import cpu_offload, disk_offload

        h = load_model(str(root / "tiny"), precision="float32")
        if kind == "cpu_offload":
            cpu_offload(h.model, execution_device=torch.device("cpu"))
        else:
            folder = root / f"disk-{len(list(root.glob('disk-*')))}"
            disk_offload(h.model, folder, execution_device=torch.device("cpu"))
    h.meta["on_disk"] = kind != "cpu_offload"
    return h


@pytest.fixture(scope="module", params=KINDS)
def off(request, root) -> ModelHandle:
    return _offloaded(request.param, root)


def _logits(h: ModelHandle, prompts=PROMPTS) -> torch.Tensor:
    with h.lock:
        return BatchRunner(h, tokenize(h, prompts)).last_logits()


def _maps(h: ModelHandle) -> dict[int, object]:
    """Every offload hook's weights map, by hook (identity: a context must put the very same map back)."""
    return {id(hook): hook.weights_map for m in h.model.modules() if (hook := offload_hook(m)) is not None}


def _edit_folders(root: Path) -> list[Path]:
    return list(root.rglob("p*-edits-*"))


def test_offloaded_weights_live_off_the_module_and_inputs_go_to_the_embedding_device(off, ref):
    writer = off.writers(1)["mlp"]
    assert writer.weight.device.type == "meta" and offload_hook(writer) is not None
    assert torch.equal(read_tensor(writer, "weight"), ref.writers(1)["mlp"].weight)
    assert off.device == module_device(off.embedding) == torch.device("cpu")
    assert tensors_fingerprint(off.model) == tensors_fingerprint(ref.model)  # offloaded tensors read where stored
    assert torch.allclose(_logits(off), _logits(ref), **EXACT)


def test_summary_records_the_device_map(root):
    h = _offloaded("device_map", root)
    s = h.summary()
    assert s["device_map"] == DEVICE_MAP and s["max_memory"] is None
    assert s["placement"] == {"disk": 5, "cpu": 3}
    folder = next((root / "off").iterdir())
    del h, s
    import gc
    gc.collect()
    assert not folder.exists()  # the model's offload folder goes with it


def test_a_merged_copy_outlives_its_original(root, ref):
    import gc

    h = _offloaded("device_map", root)
    folder = Path(offload_hook(h.writers(1)["mlp"]).weights_map.dataset.save_folder)
    repair = Repair(direction=torch.randn(ref.d_model, generator=torch.Generator().manual_seed(6)), layers=[1, 2],
                    alpha=3.0, mode="merged")
    merged = merge(h, repair)
    del h
    gc.collect()
    assert folder.exists() and any(folder.iterdir())  # the copy's disk edits live in the original's folder
    assert torch.allclose(_logits(merged), _logits(merge(ref, repair)), **EXACT)
    del merged
    gc.collect()
    assert not folder.exists()


@pytest.mark.parametrize("name", [n for n in INTERVENTIONS if n != "none"])
def test_interventions_give_the_same_numbers_and_leave_nothing_behind(off, ref, root, name):
    direction = torch.randn(ref.d_model, generator=torch.Generator().manual_seed(1))
    maps = _maps(off)
    with intervene(name, ref, direction, layer=2, coeff=4.0):
        want = _logits(ref)
    with intervene(name, off, direction, layer=2, coeff=4.0):
        got = _logits(off)
        if name == "orthogonalize":  # disk weights are edited on disk, the others in memory
            assert any(p.suffix == ".dat" for d in _edit_folders(root) for p in d.iterdir()) == off.meta["on_disk"]
    assert torch.allclose(got, want, **EXACT)
    assert not torch.allclose(want, _logits(ref), **EXACT)  # the intervention did something
    assert count_hooks(off) == 0
    assert all(maps[k] is v for k, v in _maps(off).items())  # offloaded weights put back
    assert not _edit_folders(root)
    assert torch.allclose(_logits(off), _logits(ref), **EXACT)


def test_writer_hooks_give_the_same_numbers(off, ref):
    r = torch.randn(ref.d_model, generator=torch.Generator().manual_seed(2))
    u = torch.randn(2 * ref.d_model, generator=torch.Generator().manual_seed(3))
    out = []
    for h in (ref, off):
        with scale_writers(h, r, [1, 2], alpha=2.0), add_rank1(h, r, u, 2, "mlp"):
            out.append(_logits(h))
    assert torch.allclose(out[1], out[0], **EXACT)
    assert count_hooks(off) == 0


@pytest.mark.parametrize("mode", ["merged", "adapter"])
def test_aird_repair_gives_the_same_numbers_in_both_modes(off, ref, root, mode):
    r = torch.randn(ref.d_model, generator=torch.Generator().manual_seed(4))
    u = torch.randn(2 * ref.d_model, generator=torch.Generator().manual_seed(5))
    repair = Repair(direction=r, layers=[1, 3], alpha=2.0, mode=mode, realign=u, realign_layer=2)
    maps = _maps(off)
    with applied(ref, repair) as a:
        want = _logits(a)
    with applied(off, repair) as b:
        got = _logits(b)
        if mode == "merged":
            assert b is not off and all(maps[k] is v for k, v in _maps(off).items())  # the original is untouched
            edited = b.writers(1)["mlp"]
            assert edited.weight.device.type == "meta"  # edited where it lives: still offloaded
            del edited
        del b
    assert torch.allclose(got, want, **EXACT)
    assert count_hooks(off) == 0
    assert all(maps[k] is v for k, v in _maps(off).items())
    assert torch.allclose(_logits(off), _logits(ref), **EXACT)
    import gc
    gc.collect()
    assert not _edit_folders(root)  # a merged copy's disk edits go with it


def test_direction_extraction_gives_the_same_candidates(off, ref):
    a = generate_candidates(ref, PROMPTS[:2], PROMPTS[2:])
    b = generate_candidates(off, PROMPTS[:2], PROMPTS[2:])
    assert torch.allclose(b.candidates, a.candidates, **EXACT)
    assert torch.allclose(mean_activations(off, PROMPTS).mean, mean_activations(ref, PROMPTS).mean, **EXACT)


def test_generation_and_perplexity_give_the_same_numbers(off, ref):
    ids = tokenize(ref, PROMPTS)
    assert greedy_ids(off, ids, max_new_tokens=4) == greedy_ids(ref, ids, max_new_tokens=4)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    assert perplexity(off, text, max_length=32, stride=16) == pytest.approx(perplexity(ref, text, max_length=32,
                                                                                         stride=16), rel=1e-6)


def test_logits_without_an_index_tensor_are_the_same(off, ref, monkeypatch):
    """Across GPUs accelerate moves an index tensor to the first device: the int form is used there."""
    want = _logits(ref)
    monkeypatch.setattr("refusal_lab.activations.index_keeps_logits", lambda handle: False)
    monkeypatch.setattr("refusal_lab.evaluation.index_keeps_logits", lambda handle: False)
    assert torch.allclose(_logits(off), want, rtol=1e-5, atol=1e-5)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    assert perplexity(off, text, max_length=32, stride=16) == pytest.approx(perplexity(ref, text, max_length=32,
                                                                                         stride=16), rel=1e-5)


@pytest.mark.parametrize("scheme", ["magnitude:0.5", "wanda:0.5"])
def test_compression_of_an_offloaded_model_is_the_same_variant(root, ref, scheme):
    off = _offloaded("device_map", root)
    a, rep_a = apply(ref, scheme)
    b, rep_b = apply(off, scheme)
    assert torch.allclose(_logits(b), _logits(a), **EXACT)
    ja, jb = rep_a.to_json(), rep_b.to_json()
    assert {k: v for k, v in ja.items() if k not in ("seconds", "model")} == \
        {k: v for k, v in jb.items() if k not in ("seconds", "model")}
    assert torch.allclose(_logits(off), _logits(ref), **EXACT)  # the parent is untouched


# ----------------------------------------------------------------------------------------------
# Device maps and memory limits as users write them
# ----------------------------------------------------------------------------------------------

def test_parse_device_map_and_max_memory():
    assert parse_device_map(None) is None and parse_device_map("  ") is None
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"a": 0, "b": "cuda:1", "c": "cpu", "": "disk", "d": "2"}') == \
        {"a": 0, "b": 1, "c": "cpu", "": "disk", "d": 2}
    assert parse_max_memory("0=10GiB, cpu=30GiB") == {"0": "10GiB", "cpu": "30GiB"}
    assert parse_max_memory({0: "1GB"}) == {"0": "1GB"}
    for bad, words in [("fast", "use auto"), ("{not json", "not valid JSON"), ('{"a": "tpu"}', "not a device"),
                       ('{"a": -1}', "negative"), ("{}", "non-empty"), ('{"a": true}', "not a device")]:
        with pytest.raises(ValueError, match=words):
            parse_device_map(bad)
    for bad, words in [("cpu", "KEY=SIZE"), ("gpu=1GB", "not a device"), ("0=lots", "not a size")]:
        with pytest.raises(ValueError, match=words):
            parse_max_memory(bad)


@pytest.mark.parametrize("kwargs,words", [
    (dict(device_map={"model.layers.9": "cpu", "": "disk"}), "'model.layers.9'"),
    (dict(device_map={"model.layers.0": "cpu", "model.layers.1": "disk"}), "places no device for"),
    (dict(max_memory="cpu=1GB"), "only applies with a device map"),
    (dict(device_map="auto", device="cpu"), "not both"),
])
def test_bad_placement_is_a_model_load_error(root, kwargs, words):
    with pytest.raises(ModelLoadError, match=re.escape(words)):
        load_model(str(root / "tiny"), **kwargs)
    assert not list((root / "cache" / "offload").glob(f"p{os.getpid()}-*-model-*"))  # no folder left


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_this_machine_lacks_is_a_model_load_error(root):
    with pytest.raises(ModelLoadError, match="GPU 0, but this machine has 0 CUDA"):
        load_model(str(root / "tiny"), device_map={"": 0})


@pytest.mark.parametrize("argv,words", [
    (["--device-map", '{"model.layers.9": "cpu", "": "cpu"}'], "'model.layers.9'"),
    (["--device-map", "{oops"], "not valid JSON"),
    (["--device-map", "everywhere"], "use auto"),
    (["--device-map", "auto", "--max-memory", "cpu=plenty"], "not a size"),
    (["--max-memory", "cpu=1GB"], "only applies with a device map"),
])
def test_cli_placement_errors_are_one_line(root, capfd, argv, words):
    try:
        rc = main(["info", "--model", str(root / "tiny"), *argv])
    except SystemExit as e:  # argparse
        rc = e.code
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\||it/s\]", line)]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert words in lines[0]


def test_cli_info_shows_the_placement(root, capsys):
    assert main(["info", "--model", str(root / "tiny"), "--device-map", json.dumps(DEVICE_MAP)]) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out and '"model.layers.1": "disk"' in out and "5 modules on disk" in out


def test_study_spec_keeps_old_folders_and_stores_placement():
    plain = StudySpec()
    assert "device_map" not in plain.to_dict() and "max_memory" not in plain.to_dict()
    placed = StudySpec(device_map=json.dumps(DEVICE_MAP), max_memory="cpu=2GiB")
    stored = json.loads(json.dumps(placed.to_dict()))
    assert stored["device_map"] == DEVICE_MAP and stored["max_memory"] == {"cpu": "2GiB"}
    assert StudySpec.from_dict(stored) == placed
    with pytest.raises(ValueError, match="not a device"):
        StudySpec(device_map='{"model": "tpu"}')


def test_model_page_loads_with_a_device_map_and_refuses_a_missing_layer(root, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("REFUSAL_LAB_RUNS", str(root / "runs"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=300)
    at.session_state["model_cfg"] = {"spec": str(root / "tiny"), "device": "auto", "dtype": "float32",
                                     "trust_remote_code": False, "chat_template": None}
    at.run()
    at.switch_page("pages/model.py").run()
    [field] = [t for t in at.text_input if t.label.startswith("Device map")]
    field.set_value(json.dumps({**DEVICE_MAP, "model.layers.7": "cpu"}))
    at.button[0].click().run()
    assert not at.exception and any("'model.layers.7'" in e.value for e in at.error), [e.value for e in at.error]
    assert at.session_state["model_cfg"].get("device_map") is None  # the previous model stays
    [field] = [t for t in at.text_input if t.label.startswith("Device map")]
    field.set_value(json.dumps(DEVICE_MAP))
    at.button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("5 modules on disk" in c.value for c in at.caption)
    assert {m.label: m.value for m in at.metric}["Layers"] == "4"
