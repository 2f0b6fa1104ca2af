"""The token page in a real headless browser (Debian's chromium, installed by scripts/setup_browser.sh):
every sample rendered on the page carries the dump's token count, hostile token text stays text, and a
screenshot is written. Skipped, with the reason, when chromium cannot be installed or started."""

from __future__ import annotations

import random
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from self_distillation.token_dump import DumpRecord, TokenFields, dump_path, load_dump, save_dump
from self_distillation.token_page import build_token_page, main, save_token_page

ROOT = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def _find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@pytest.fixture(scope="session")
def browser(tmp_path_factory) -> str:
    path = _find_browser()
    note = ""
    if path is None:  # the test setup installs it when it may (apt-get as root); never fails
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "setup_browser.sh")], capture_output=True, text=True, timeout=900
        )
        note = (result.stdout + result.stderr).strip()
        path = _find_browser()
    if path is None:
        pytest.skip(f"no headless chromium: {note or 'scripts/setup_browser.sh installed none'}")
    probe = tmp_path_factory.mktemp("probe")
    (probe / "p.html").write_text("<div id=x></div><script>x.dataset.ok='yes'</script>")
    try:
        out = _run(path, probe, ["--dump-dom", (probe / "p.html").as_uri()])
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"{path} cannot start: {exc}")
    if 'data-ok="yes"' not in out.stdout:
        pytest.skip(f"{path} did not run the page's script: {out.stderr[-500:]}")
    return path


def _run(browser: str, tmp: Path, args: list[str]) -> subprocess.CompletedProcess:
    profile = tmp / "profile"
    cmd = [browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _record(i: int, n: int, reward: int, seed: int) -> DumpRecord:
    rng = random.Random(seed)
    words = ["So", " 3", " +", " 4", " =", " 7", "\n", " <script>", "</script>", " & ", " é", ""]
    pieces = [rng.choice(words) for _ in range(n - 4)] + [" \\boxed{", "7", "}", "<|im_end|>"]
    kl = [rng.expovariate(1.0) * (3 if reward == 0 else 0.2) for _ in range(n)]
    return DumpRecord(
        step=10,
        problem_index=i,
        reward=reward,
        teacher_context="self_revision",
        teacher_context_text="<|im_start|>user\nWhat is 3 + 4?</script><|im_end|>\n... Wait, this response is wrong.",
        token_ids=list(range(n)),
        token_strings=pieces,
        fields=TokenFields(
            kl=kl,
            student_logprob=[-rng.random() for _ in range(n)],
            teacher_logprob=[-rng.random() for _ in range(n)],
            student_top_ids=[[1, 2, 3, 4, 5]] * n,
            student_top_probs=[[0.5, 0.2, 0.1, 0.1, 0.05]] * n,
            teacher_top_ids=[[5, 4, 3, 2, 1]] * n,
            teacher_top_probs=[[0.6, 0.2, 0.1, 0.05, 0.05]] * n,
        ),
        strings={1: " a", 2: "\n", 3: "</script>", 4: "<b>", 5: "7"},
        num_tokens=n,
        problem="What is 3 + 4?",
    )


class _Samples(HTMLParser):
    """data-tokens and the number of .tok spans of every .sample container in a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.samples: dict[int, dict[str, int]] = {}
        self._stack: list[int | None] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        owner = self._stack[-1] if self._stack else None
        classes = (a.get("class") or "").split()
        if "sample" in classes:
            owner = int(a["data-index"])
            self.samples[owner] = {"data_tokens": int(a.get("data-tokens", -1)), "spans": 0}
        elif "tok" in classes and owner is not None:
            self.samples[owner]["spans"] += 1
        self._stack.append(owner)

    def handle_endtag(self, tag):
        if self._stack:
            self._stack.pop()


def test_every_sample_on_the_page_has_the_dumps_token_count(browser, tmp_path):
    lengths = [(40, 0), (3000, 0), (25, 1), (900, 1), (5, 0)]  # one long response: chunked rendering
    records = [_record(i, n, r, seed=i) for i, (n, r) in enumerate(lengths)]
    _, back = load_dump(save_dump(dump_path(tmp_path, 10), 10, records))
    page = save_token_page(tmp_path / "page.html", back, title="test </script> page")
    text = page.read_text()
    assert "src=" not in text and "href=" not in text and "http" not in text  # self-contained

    out = _run(browser, tmp_path, ["--dump-dom", page.as_uri() + "#all"])
    parser = _Samples()
    parser.feed(out.stdout)
    assert 'data-rendered="all"' in out.stdout, out.stderr[-2000:]
    assert sorted(parser.samples) == list(range(len(back)))
    for i, record in enumerate(back):
        got = parser.samples[i]
        assert got["data_tokens"] == len(record.token_ids) == got["spans"], (i, got)
    # list rows (all samples) carry the counts too
    assert out.stdout.count('class="row') == len(back)

    # the default view renders only the selected sample (the largest mean KL first)
    lazy = _run(browser, tmp_path, ["--dump-dom", page.as_uri()])
    lazy_parser = _Samples()
    lazy_parser.feed(lazy.stdout)
    assert len(lazy_parser.samples) == 1
    (index, got), = lazy_parser.samples.items()  # fmt: skip
    assert got["data_tokens"] == got["spans"] == len(back[index].token_ids)

    shot = tmp_path / "page.png"
    _run(browser, tmp_path, [f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri()])
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_page_escapes_data_and_the_cli_writes_next_to_the_dump(tmp_path):
    records = [_record(0, 12, 0, seed=1)]
    html = build_token_page(records, title="t")
    data = html.split('id="data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data  # every "<" of the data is \u003c: no token text can close the script element
    path = save_dump(dump_path(tmp_path, 3), 3, records, meta={"teacher_context": "self_revision"})
    written = main([str(path)])
    assert written == path.with_name("step_000003.html") and "self_revision" in written.read_text()
