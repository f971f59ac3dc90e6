"""The user-facing prose of AIRD's verdicts (the decisions are in :mod:`refusal_lab.aird.diagnosis`): what the
projections predict before a repair, and what the measured repair means."""

from __future__ import annotations


def recoverability(level: str, layer: int, d_c: float, d_o: float, ratio: float, shift: float) -> str:
    """The text of a recoverability ``level`` (recoverable, partial-shifted, partial, unrecoverable) at the
    source ``layer``: Cohen's d of C and O, their ``ratio``, and how far C's harmless prompts ``shift``ed."""
    if level == "partial-shifted":
        return (f"Partly recoverable by scaling alone: harmful and harmless prompts still separate along "
                f"the original refusal direction at layer {layer} (Cohen's d {d_c:.2f} vs "
                f"{d_o:.2f} in the original), but harmless prompts moved {100 * shift:.0f}% of "
                "the way toward the harmful ones, so the compressed model already over-refuses, and "
                "amplifying r̂ raises their refusal too. AIRD's fitted re-alignment, which moves each "
                "prompt by what it contains, can pull them back; calibration uses it when it helps.")
    if level == "recoverable":
        return (f"Recoverable: harmful and harmless prompts still separate along the original refusal "
                f"direction at layer {layer} (Cohen's d {d_c:.2f} vs {d_o:.2f} in the "
                "original), so amplifying that component can restore refusal.")
    if level == "partial":
        return (f"Partly recoverable: the separation along the original direction at layer {layer} shrank to "
                f"{100 * ratio:.0f}% of the original's (d {d_c:.2f} vs {d_o:.2f}); "
                "a repair will recover some refusal, and cost more over-refusal.")
    return (f"Not recoverable by a weight edit: compression removed most of the harmful/harmless "
            f"separation along the original direction at layer {layer} (d {d_c:.2f} vs "
            f"{d_o:.2f}). Amplifying r̂ would push harmless prompts as much as harmful "
            "ones. Use a milder compression or keep this layer dense.")


def _rates(set_name: str, original: float, compressed: float, repaired: float) -> str:
    return (f"refusal on {set_name}: original {100 * original:.1f}%, compressed {100 * compressed:.1f}%, "
            f"repaired {100 * repaired:.1f}%")


def nothing_lost(set_name: str, original: float, compressed: float, repaired: float) -> str:
    return f"Compression cost almost no refusal ({_rates(set_name, original, compressed, repaired)}); there was nothing to recover."


def repair_outcome(level: str, predicted: str | None, share: float, set_name: str, original: float,
                   compressed: float, repaired: float, *, perplexity_ratio: float | None = None,
                   layer: int | None = None, separation: tuple[float, float] | None = None,
                   method: str = "AIRD") -> str:
    """The measured repair's text: the share recovered by ``method`` (the repair's name), then — for a failed
    repair — why (a broken model, given its ``perplexity_ratio``; or, for AIRD, damage after the direction
    is written, given the predicted ``separation`` (d of C, d of O) at ``layer``), or that the prediction
    was wrong."""
    text = (f"{method} brought back {100 * share:.0f}% of the refusal lost to compression "
            f"({_rates(set_name, original, compressed, repaired)}).")
    if level == "not recovered" and perplexity_ratio is not None:
        text += (f" The compressed model's perplexity is {perplexity_ratio:.0f}× the original's: it no longer "
                 "writes fluent text, so there is no refusal left to steer, and no edit along one direction "
                 "repairs a broken model. Use a milder compression.")
    elif level == "not recovered" and predicted in ("recoverable", "partial") and method == "AIRD":
        sep = f" (Cohen's d {separation[0]:.2f} vs {separation[1]:.2f})" if separation is not None else ""
        text += (f" The projections predicted more: harmful and harmless prompts still separate along the "
                 f"original direction at layer {layer}{sep}, yet amplifying that component barely restores refusal: "
                 "most of the damage lies after the direction is written, in the layers that turn it into a "
                 "refusal, which an edit along r̂ does not undo. Use a milder compression or keep the later "
                 "layers dense.")
    elif level == "recovered" and predicted == "unrecoverable":
        text += " The projections had predicted otherwise; the measurement is what counts."
    return text
