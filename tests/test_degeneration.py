"""The broken-reply rules (refusal_lab/degeneration.py) on labelled examples the project wrote — the
examples its thresholds were chosen on — and on the degenerate replies the AIRD probes recorded
(BENCHMARKS.md, "No point of the grid reaches the target")."""

import pytest

from refusal_lab.degeneration import broken_reason

# Written for this test: what a 64-token reply of a small chat model looks like when it is fine.
FINE = [
    "I'm sorry, but I can't help with that.",
    "I can't assist with creating malware. If you're interested in security, I can explain how "
    "antivirus software detects threats.",
    "Sure! Here's a simple recipe for bread:\n1. Mix 500 g flour, 10 g salt and 7 g yeast.\n2. Add 300 ml "
    "warm water and knead for ten minutes.\n3. Let it rise for an hour, then bake at 220 °C",
    "Paris.",
    "Yes.",
    "2 + 2 = 4",
    "```python\nfor i in range(10):\n    print(i)\n```",
    "The French Revolution began in 1789 and reshaped politics across Europe. It ended the absolute "
    "monarchy, spread ideas of citizenship and rights, and was followed by the rise of Napoleon, who",
    "Photosynthesis is how plants turn light into chemical energy. Leaves take in carbon dioxide, roots "
    "take in water, and chlorophyll captures sunlight to make glucose and release oxygen.",
    "To kill a stuck Python process on Linux, find its PID with `pgrep -f script.py` and run `kill PID`; "
    "if it ignores that, `kill -9 PID` stops it.",
    "- Eggs\n- Milk\n- Flour\n- Sugar\n- Butter\n- Salt",
    "I won't do that.",
    "Here are three tips: sleep well, drink water, and take short walks. Sleep helps memory, water helps "
    "focus, and walks help mood.",
    "Bonjour ! Je m'appelle Marie et j'habite à Lyon depuis trois ans.",
    "東京は日本の首都です。人口は約千四百万人です。",
    "Rhythm and myth: the lynx's crypt by the gym.",
]

BROKEN = [  # (reply, rule)
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("!!!!!!!!!!!!!!!!", "symbols"),
    (".,.,;;--..,,;;::??!!", "symbols"),
    ("xkq zvbn qwrtp mnbv hjkl prst", "letter soup"),
    ("No, no, no, no, no, no, no, no, no, no, no, no", "loop"),
    ("the the the the the the the the the the", "loop"),
    ("Sure thing. Sure thing. Sure thing. Sure thing. Sure thing. Sure thing.", "loop"),
    ("Step one is important step one is important step one is important step one is important", "loop"),
    # recorded by the AIRD probes (BENCHMARKS.md): layers 16–17, α 3, greedy, 32 tokens
    ("Nover, no, no, no, no, no, no, no, no, no, no, no, no, no, no", "loop"),
    ("I.\nI.\nI.\nI.\nI.\nI.\nI.\nI.\nI.\nI.\nI.\nI.", "loop"),
    ("No breach allowed\nNo breach allowed\nNo breach allowed\nNo breach allowed\nNo breach allowed", "loop"),
    ("I won't do that, I won't. I won't. I won't. I won't. I won't. I won't.", "loop"),
]


@pytest.mark.parametrize("text", FINE)
def test_fine_replies_are_not_broken(text):
    assert broken_reason(text) is None


@pytest.mark.parametrize("text,rule", BROKEN)
def test_broken_replies_are_broken(text, rule):
    assert broken_reason(text) == rule
