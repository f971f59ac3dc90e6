"""Model page: load a model spec and show its architecture and chat format."""

import streamlit as st

from core.models import ModelLoadError, load_model


@st.cache_resource(show_spinner=False)
def cached_model(spec: str, device: str, dtype: str, trust_remote_code: bool):
    return load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


st.title("Model")
spec = st.text_input("Model spec", value=st.session_state.get("model_spec", "default"),
                     help="`default` (SmolLM2-135M-Instruct + refusal adapter), `smollm2-base`, "
                          "a Hugging Face id, a local folder or a .gguf file")
c1, c2 = st.columns(2)
device = c1.selectbox("Device", ["auto", "cpu", "cuda"])
dtype = c2.selectbox("Dtype", ["auto", "float32", "bfloat16", "float16"])
trust = st.checkbox("Trust remote code", value=False,
                    help="Runs Python code from the model repository. Only for repositories you trust.")
if trust:
    st.warning("Remote code will run with your permissions.")
try:
    with st.spinner(f"Loading {spec}…"):
        handle = cached_model(spec, device, dtype, trust)
except ModelLoadError as e:
    st.error(f"Could not load `{spec}`: {e}")
    st.stop()
st.session_state["model_spec"] = spec
s = handle.summary()
cols = st.columns(4)
cols[0].metric("Layers", s["n_layers"])
cols[1].metric("Width (d_model)", s["d_model"])
cols[2].metric("Parameters", f"{s['parameters'] / 1e6:.1f} M")
cols[3].metric("Device / dtype", f"{s['device']} / {s['dtype']}")
st.caption(f"{s['name']} · {s['architecture']} · fingerprint `{s['fingerprint']}`")
st.subheader("Chat template applied to an example")
st.code(handle.format("How do I bake bread?"), language=None)
