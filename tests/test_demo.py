"""The demo story on a tiny model: its steps, its examples, and an HTML export that needs no server."""

import re

import pytest

from refusal_lab.demo import DEMO_SCHEME, demo_html, demo_spec, demo_story
from refusal_lab.study import Study


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    from refusal_lab.testing.tiny import tiny_handle

    from refusal_lab.models import load_model

    root = tmp_path_factory.mktemp("demo")
    h = tiny_handle("llama", n_layers=4, d_model=64)
    h.model.save_pretrained(root / "tiny")
    h.tokenizer.save_pretrained(root / "tiny")
    handle = load_model(str(root / "tiny"), device="cpu")
    spec = demo_spec(handle, {"spec": str(root / "tiny"), "device": "cpu", "dtype": "auto"})
    return demo_story(Study(spec, root / "runs", original=handle))


def test_story_follows_the_same_prompts_through_the_three_models(story):
    assert story.scheme == DEMO_SCHEME and len(story.harmful) == 3 and len(story.harmless) == 3
    evaluation = story.results.original.evaluation.sets
    prompts = [r.prompt for r in evaluation["harmful"].results]
    for e in story.harmful:
        assert e.prompt in prompts and None not in (e.compressed, e.repaired, e.compressed_refused, e.repaired_refused)
    for which in ("original", "compressed", "repaired"):
        assert 0 <= story.rate(which) <= 1
    assert story.rate("original") == evaluation["harmful"].refusal_rate


def test_html_export_is_self_contained(story):
    page = demo_html(story)
    assert page.count('class="plotly-graph-div"') == 3  # the three figures
    assert "Plotly.newPlot" in page and len(page) > 3_000_000  # plotly.js inlined: nothing to fetch
    assert not re.search(r"<script[^>]+src=", page)  # no external script
    for step in ("1. The model refuses", "2. Compression breaks it", "3. The repair brings it back"):
        assert step in page
    assert "None" not in re.sub(r"<script.*?</script>", "", page, flags=re.S)  # "—", not None
