"""Final-answer extraction from a response, shared by every reward source and by evaluation.

The answer is the content of the LAST `\\boxed{...}` / `\\fbox{...}` (brace matching, escaped braces, the
`\\boxed 5` form); with `extraction="boxed_or_last_number"` a response without one falls back to its last
number (explicit and non-default: the original Phase-1 grader always did this, which marks unboxed or
truncated answers correct). Ground truths are normalised the same way (GSM8K `... #### 1,234` -> `1234`).
Pure Python: no math-verify, no worker processes (`rewards.math_verify` compares the extracted answers).
"""

from __future__ import annotations

import re

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,]|\.\d)")


def _match_braces(text: str, open_pos: int) -> int | None:
    """Index of the `}` closing the `{` at open_pos, skipping escaped braces; None if unbalanced."""
    depth = 0
    i = open_pos
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # `\{`, `\}` and `\\` never open or close a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxed_content_at(text: str, end_of_command: int) -> str | None:
    i = end_of_command
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] == "{":
        close = _match_braces(text, i)
        return None if close is None else text[i + 1 : close]
    if i == end_of_command:  # `\boxed5`: a single-character argument, as in TeX
        return text[i] if not text[i].isspace() and text[i] not in "$\\" else None
    match = re.match(r"[^\s$]+", text[i:])  # `\boxed 5`, `\boxed -3.5$`
    return match.group(0).rstrip(".,;") if match else None


def extract_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed`/`\\fbox` in `text`, or None (empty boxes count as none)."""
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        content = _boxed_content_at(text, match.end())
        if content is not None and content.strip():
            return content.strip()
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators removed), or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(response: str, extraction: str = "boxed") -> str | None:
    if extraction not in ("boxed", "boxed_or_last_number"):
        raise ValueError(f"unknown extraction mode {extraction!r}")
    answer = extract_boxed(response)
    if answer is None and extraction == "boxed_or_last_number":
        answer = extract_last_number(response)
    return answer


def normalize_ground_truth(ground_truth: str) -> str:
    """GSM8K `...#### 1,234` -> `1234`; other answers are stripped only."""
    text = ground_truth.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    return strip_thousands(text)


def strip_thousands(text: str) -> str:
    """`1,234,567` -> `1234567` when the whole answer is one number (a tuple `1,234` of two ints is rare
    as a final answer, while GSM8K-style `1,234` is common)."""
    return text.replace(",", "") if _THOUSANDS.fullmatch(text.strip().lstrip("-$")) else text
