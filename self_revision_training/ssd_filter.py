"""SSD data filter: which self-generated samples become SFT data (related_methods.md 4(a), 4(e)).

"Embarrassingly Simple Self-Distillation Improves Code Generation" (arXiv 2604.01193) fine-tunes a model
on its own unverified samples after two filters, from apple/ml-ssd:data_generation/generate.py @15c4292
(STAGE 3): drop empty responses, then drop the shortest `filter_shortest_percent` (10) per cent by
character length of the stripped response:

    lengths = sorted(len(r.strip()) for r in non-empty responses)
    cutoff  = lengths[min(int(len(lengths) * percent / 100.0), len(lengths) - 1)]   # 0 if percent <= 0
    keep r iff len(r.strip()) >= cutoff                                           # ties are kept

ml-ssd keeps samples cut at max tokens (`finish_reason == "length"`); the SSD-on-math port trains only on
non-truncated ones, so an optional truncation filter is added here. Order (each sample is counted under
the first filter that drops it, so empty + truncated + shortest + kept == input):

    1. empty      response.strip() == ""                         (drop_empty)
    2. truncated  finish_reason == "length"                      (drop_truncated; off = ml-ssd)
    3. shortest   the rule above over the samples that remain    (shortest_percent; 0 = off)

With drop_truncated=False this is ml-ssd's rule exactly (cutoff over all non-empty samples). With it on,
the cutoff is computed after truncated samples are gone, so `shortest_percent` is a share of the data
actually trained on. ml-ssd also drops samples with an empty prompt; prompts are not checked here.
ml-ssd trains on the stripped response (its generator strips every output), so callers should too.
Pure Python. Usage (e.g. in the `ssd` data stage):

    kept, report = filter_ssd_samples(texts, finish_reasons, drop_truncated=True)
"""

from __future__ import annotations

from collections.abc import Sequence

FINISH_REASONS = ("stop", "length")  # vLLM / HF backend values; "length" = stopped at max tokens
FILTER_ORDER = ("empty", "truncated", "shortest")


def compute_length_cutoff(lengths: Sequence[int], shortest_percent: float) -> int:
    """ml-ssd's minimum kept length: sorted(lengths)[min(int(n * percent / 100), n - 1)].

    Args:
        lengths: character lengths of the candidate samples.
        shortest_percent: share to drop, in per cent (ml-ssd's `filter_shortest_percent`); <= 0 = off.
    Returns:
        the cutoff in characters (samples shorter than it are dropped); 0 when off or no samples.
    """
    if shortest_percent <= 0 or not lengths:
        return 0
    ordered = sorted(lengths)
    # Same float expression as ml-ssd (percent, not a fraction): int(n * 10 / 100.0).
    return ordered[min(int(len(ordered) * shortest_percent / 100.0), len(ordered) - 1)]


def filter_ssd_samples(
    texts: Sequence[str],
    finish_reasons: Sequence[str | None] | None = None,
    *,
    drop_empty: bool = True,
    drop_truncated: bool = False,
    shortest_percent: float = 10.0,
) -> tuple[list[int], dict[str, int]]:
    """Apply the SSD filters in FILTER_ORDER and count what each one dropped.

    Args:
        texts: one response per sample.
        finish_reasons: "stop" | "length" per sample (None entries count as "stop"); required when
            drop_truncated is True.
        drop_empty: drop responses that are empty after strip() (ml-ssd: always on).
        drop_truncated: drop finish_reason == "length" (ml-ssd: off; SSD-on-math port: on).
        shortest_percent: drop the shortest this-many per cent by stripped character length (ml-ssd:
            10); 0 = off. Must be in [0, 100).
    Returns:
        (kept, report): kept indices into `texts`, ascending; report with the counts
        {input, empty, truncated, shortest, kept} and cutoff_chars (0 = the length filter dropped nothing
        by construction: off, or nothing left).
    """
    if not 0 <= shortest_percent < 100:
        raise ValueError(f"shortest_percent must be in [0, 100), got {shortest_percent}")
    if finish_reasons is not None:
        if len(finish_reasons) != len(texts):
            raise ValueError(f"{len(finish_reasons)} finish_reasons for {len(texts)} texts")
        unknown = {r for r in finish_reasons if r is not None and r not in FINISH_REASONS}
        if unknown:
            raise ValueError(f"unknown finish_reason values {sorted(unknown)}; expected {FINISH_REASONS}")
    elif drop_truncated:
        raise ValueError("drop_truncated needs finish_reasons")

    lengths = [len(text.strip()) for text in texts]
    remaining = list(range(len(texts)))
    report = {"input": len(texts), "empty": 0, "truncated": 0, "shortest": 0, "kept": 0, "cutoff_chars": 0}

    if drop_empty:
        survivors = [i for i in remaining if lengths[i] > 0]
        report["empty"] = len(remaining) - len(survivors)
        remaining = survivors
    if drop_truncated and finish_reasons is not None:  # None with drop_truncated was rejected above
        survivors = [i for i in remaining if finish_reasons[i] != "length"]
        report["truncated"] = len(remaining) - len(survivors)
        remaining = survivors
    cutoff = compute_length_cutoff([lengths[i] for i in remaining], shortest_percent)
    survivors = [i for i in remaining if lengths[i] >= cutoff]
    report["shortest"] = len(remaining) - len(survivors)
    report["cutoff_chars"] = cutoff
    report["kept"] = len(survivors)
    return survivors, report
