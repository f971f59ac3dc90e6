"""Model page: choose a model spec, device (or a device map), dtype; show architecture, chat format and memory."""

import os

import pandas as pd
import streamlit as st

from refusal_lab.models import ChatTemplateError
from refusal_lab.precision import PRECISIONS
from pages._shared import default_cfg, fix_for, load_handle, model_cfg, show_error, MODEL_CFG

st.title("Model")
cfg = model_cfg()

PRESETS = {"default": "Default — SmolLM2-135M-Instruct + refusal adapter",
           "smollm2-base": "SmolLM2-135M-Instruct (untouched)",
           "custom": "Hugging Face id, local folder or .gguf file"}
preset = cfg["spec"] if cfg["spec"] in ("default", "smollm2-base") else "custom"

trust = st.checkbox("Trust remote code (applies on the next Load)", value=cfg["trust_remote_code"],
                    help="Runs Python code shipped in the model repository with your permissions.")
if trust:
    st.warning("**Trust remote code is on**: Python code from the model repository will run on this "
               "machine with your permissions. Only use it for repositories you trust.", icon=":material/warning:")

with st.form("model_form"):
    choice = st.radio("Model", list(PRESETS), format_func=PRESETS.get, index=list(PRESETS).index(preset),
                      horizontal=True)
    custom = st.text_input("Spec (when *custom*)", value=cfg["spec"] if preset == "custom" else "",
                           placeholder="Qwen/Qwen2.5-0.5B-Instruct · /path/to/folder · /path/model.gguf")
    c1, c2, c3 = st.columns(3)
    devices = ["auto", "cpu", "cuda"]
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    device = c1.selectbox("Device", devices, index=devices.index(cfg["device"]))
    dtype = c2.selectbox("Dtype", dtypes, index=dtypes.index(cfg["dtype"]),
                         help="auto = float32 on CPU, bfloat16 on GPU")
    precisions = list(PRECISIONS)
    precision = c3.selectbox("Compute precision", precisions, index=precisions.index(cfg.get("precision", "auto")),
                             help="auto = bfloat16 matmuls (float32 weights and accumulation) where the hardware "
                                  "has native bf16, else float32. float32 is exact; bf16 is faster and its "
                                  "differences are measured in BENCHMARKS.md. Results of the two are stored apart.")
    with st.expander("Advanced", expanded=bool(cfg.get("device_map"))):
        template = st.text_area("Chat template (Jinja) for models without one", value=cfg.get("chat_template") or "",
                                height=80)
        m1, m2 = st.columns(2)
        device_map = m1.text_input(
            "Device map (instead of Device)", value=cfg.get("device_map") or "",
            placeholder='auto · balanced · sequential · {"model.layers.0": 0, "model.layers.1": "cpu", "": "disk"}',
            help="Spreads the model over GPUs, CPU memory and disk with accelerate (leave Device on auto). A JSON "
                 "object maps module names to a GPU index, cpu or disk.")
        max_memory = m2.text_input("Max memory per device", value=cfg.get("max_memory") or "",
                                   placeholder="0=10GiB,cpu=30GiB", help="Limits for the device map (auto/balanced/"
                                   "sequential): KEY=SIZE pairs, KEY a GPU index, cpu or disk.")
    submitted = st.form_submit_button("Load", type="primary")

if submitted:
    spec = custom.strip() if choice == "custom" else choice
    if not spec:
        show_error("No model spec", "the *custom* choice needs a spec.",
                   "type a Hugging Face id, a local folder or a .gguf path — or pick the default.")
    else:
        new = {"spec": spec, "device": device, "dtype": dtype, "precision": precision, "trust_remote_code": bool(trust),
               "chat_template": template.strip() or None, "device_map": device_map.strip() or None,
               "max_memory": max_memory.strip() or None}
        try:
            with st.spinner(f"Loading `{spec}` …"):
                load_handle(new)
        except Exception as e:  # noqa: BLE001 — shown, never a traceback; the previous model stays
            show_error(f"Could not load `{spec}`", e,
                       fix_for(e) + " The previously loaded model is still in use.")
        else:
            st.session_state[MODEL_CFG] = new
            cfg = new

try:
    with st.spinner(f"Loading `{cfg['spec']}` (once per server) …"):
        handle = load_handle(cfg)
except Exception as e:  # noqa: BLE001
    show_error(f"Could not load `{cfg['spec']}`", e, fix_for(e))
    if st.button("Back to the default model"):
        st.session_state[MODEL_CFG] = default_cfg()
        st.rerun()
    st.stop()

s = handle.summary()
param_bytes = sum(p.numel() * p.element_size() for p in handle.model.parameters())
cols = st.container(key="model_summary").columns(5)
cols[0].metric("Layers", s["n_layers"])
cols[1].metric("Width (d_model)", s["d_model"])
cols[2].metric("Parameters", f"{s['parameters'] / 1e6:.1f} M")
cols[3].metric("Weights in memory", f"{param_bytes / 2**20:.0f} MiB")
short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
cols[4].metric("Device · dtype · compute", f"{s['device']} · {short.get(s['dtype'], s['dtype'])} · "
               f"{short.get(s['precision'], s['precision'])}",
               help="compute: the precision of forward passes (bf16 = bfloat16 autocast over float32 weights)")
try:
    import psutil
    rss = psutil.Process(os.getpid()).memory_info().rss
    vm = psutil.virtual_memory()
    st.caption(f"Server process memory: {rss / 2**30:.2f} GiB · machine: {vm.available / 2**30:.1f} GiB free "
               f"of {vm.total / 2**30:.1f} GiB")
except ImportError:
    pass
st.caption(f"**{s['name']}** · `{s['spec']}` · {s['architecture']} · fingerprint `{s['fingerprint']}`")
if s["device_map"] is not None:
    spread = ", ".join(f"{n} modules on {d}" for d, n in s["placement"].items()) or "everything on one device"
    st.caption(f"Device map `{s['device_map'] if isinstance(s['device_map'], str) else 'custom'}`"
               + (f" · max memory {s['max_memory']}" if s["max_memory"] else "") + f": {spread} (accelerate). "
               "Offloaded weights are read from CPU memory or disk at each forward: slower, same numbers.")
for w in handle.meta.get("warnings", []):
    st.warning(w)

st.subheader("Chat template applied to an example")
example = st.text_input("Example instruction", value="How do I bake bread?")
try:
    st.code(handle.format(example), language=None)
except ChatTemplateError as e:
    show_error("No chat template", e, "paste a Jinja chat template under *Advanced* above and click Load.")

with st.expander("Residual writers per layer (found by structure)"):
    rows = []
    for layer in range(handle.n_layers):
        w = handle.writers(layer)
        rows.append({"layer": layer, "attention out": type(w["attn"]).__name__,
                     "attention shape": "×".join(map(str, w["attn"].weight.shape)),
                     "MLP out": type(w["mlp"]).__name__, "MLP shape": "×".join(map(str, w["mlp"].weight.shape))})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", placeholder="—")
