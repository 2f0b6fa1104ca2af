"""One self-contained HTML page per token dump or analysis: each response coloured by the teacher-student KL.

    python -m self_distillation.token_page RUN/distill/dumps/step_000010.jsonl.gz [OUT.html]
    save_token_page(path, records, title=...)        # from `localization.DumpRecord`s

No network, no CDN: inline CSS and JS, the data embedded as JSON, the statistics
(`localization.compute_localization_stats`) as inline SVG. The sample list filters by r and by a minimum
mean KL and sorts by mean/max KL or length; the selected sample's tokens are rendered lazily, in chunks of
2,000 spans per task, so responses of thousands of tokens stay responsive. Hovering a token shows its KL,
both sampled-token log-probs and the teacher's vs the student's top-5 with probabilities; clicking pins
them with the tail of the teacher context the token was scored in (the whole context is above the
tokens). Token colour: KL / scale, scale = the 99th percentile of the dump's token KLs (or its maximum).
Each rendered sample's container carries data-tokens (its rendered token spans); `page.html#all`
renders every listed sample (what the browser test reads) and `page.html#tok=3:120` opens sample 3 with
its token 120 pinned (for screenshots).
"""

from __future__ import annotations

import html
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from self_distillation.localization import compute_localization_stats, final_answer_tokens
from self_distillation.token_dump import DumpRecord, load_dump
from self_revision_training.shared.storage import atomic_write_text

COLORS = {"r0": "#dc2626", "r1": "#2563eb"}


def _sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}") if math.isfinite(value) else 0.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def page_data(records: Sequence[DumpRecord]) -> dict[str, Any]:
    """What the page's JS reads: per sample its tokens and per-token fields, plus the shared id strings."""
    samples, strings, all_kl = [], {}, []
    for i, r in enumerate(records):
        f = r.fields
        kl = [max(0.0, float(v)) for v in f.kl]
        all_kl += kl
        strings.update({str(k): v for k, v in r.strings.items()})
        samples.append(
            {
                "i": i,
                "r": int(r.reward),
                "step": r.step,
                "problem_index": r.problem_index,
                "sample_index": r.sample_index,
                "context_name": r.teacher_context,
                "context": r.teacher_context_text,
                "problem": r.problem,
                "n": len(r.token_ids),
                "num_tokens": r.num_tokens,
                "kl_mean": _sig(sum(kl) / len(kl)) if kl else 0.0,
                "kl_max": _sig(max(kl, default=0.0)),
                "tokens": r.token_strings,
                "kl": [_sig(v) for v in kl],
                "slp": [_sig(v) for v in f.student_logprob],
                "tlp": [_sig(v) for v in f.teacher_logprob],
                "sti": f.student_top_ids,
                "stp": [[_sig(p, 3) for p in row] for row in f.student_top_probs],
                "tti": f.teacher_top_ids,
                "ttp": [[_sig(p, 3) for p in row] for row in f.teacher_top_probs],
                "answer": final_answer_tokens(r.token_strings) or [],
            }
        )
    p99, peak = _percentile(all_kl, 0.99), max(all_kl, default=0.0)
    return {"samples": samples, "strings": strings, "scale": {"p99": p99 or peak or 1.0, "max": peak or 1.0}}


def _svg_profile(stats: Mapping[str, Any], width: int = 320, height: int = 150) -> str:
    """Mean KL by relative position (one line per r)."""
    pad, series = 30, {k: v["position"] for k, v in stats.items() if v["num_samples"]}
    top = max((v for p in series.values() for v in p if v is not None), default=0.0) or 1.0
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="KL by position">']
    parts.append(f'<text x="{pad}" y="12" class="t">mean KL by relative position</text>')
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - 5}" y2="{height - pad}" class="ax"/>')
    parts.append(f'<line x1="{pad}" y1="20" x2="{pad}" y2="{height - pad}" class="ax"/>')
    parts.append(
        f'<text x="2" y="26" class="l">{top:.3g}</text><text x="2" y="{height - pad}" class="l">0</text>'
    )
    parts.append(f'<text x="{pad}" y="{height - 12}" class="l">start</text>')
    parts.append(f'<text x="{width - 30}" y="{height - 12}" class="l">end</text>')
    for key, profile in series.items():
        bins = len(profile)
        points = [
            f"{pad + (b + 0.5) * (width - pad - 5) / bins:.1f},{height - pad - v / top * (height - pad - 20):.1f}"
            for b, v in enumerate(profile)
            if v is not None
        ]
        color = COLORS.get(key, "#555")
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(points)}"/>')
        parts.append(
            f'<text x="{width - 30}" y="{30 + 12 * list(series).index(key)}" fill="{color}" class="l">{key}</text>'
        )
    return "".join(parts) + "</svg>"


def _svg_bars(stats: Mapping[str, Any], width: int = 380, height: int = 150) -> str:
    """Shares in [0, 1] side by side per r: top-5%/10% KL share, Gini, answer KL share vs answer token share."""
    names = [("top5_share", "top 5%"), ("top10_share", "top 10%"), ("gini", "Gini"),
             ("answer_kl_share", "ans KL"), ("answer_token_share", "ans tok")]  # fmt: skip
    keys = [k for k, v in stats.items() if v["num_samples"]]
    pad, group = 25, (width - 30) / len(names)
    bar = group / (len(keys) + 1) if keys else group
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="concentration">']
    parts.append(f'<text x="{pad}" y="12" class="t">concentration (share of KL, 0-1)</text>')
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width}" y2="{height - pad}" class="ax"/>')
    for g, (name, label) in enumerate(names):
        x0 = pad + g * group
        parts.append(f'<text x="{x0 + 2:.1f}" y="{height - 10}" class="l">{label}</text>')
        for j, key in enumerate(keys):
            value = stats[key].get(name)
            if value is None or not math.isfinite(value):
                continue
            h = value * (height - pad - 20)
            parts.append(
                f'<rect x="{x0 + j * bar:.1f}" y="{height - pad - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                f'fill="{COLORS.get(key, "#555")}"><title>{key} {label}: {value:.3f}</title></rect>'
            )
    return "".join(parts) + "</svg>"


def _stats_table(stats: Mapping[str, Any]) -> str:
    keys = list(stats)
    rows = ["<tr><th></th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"]
    for name in stats[keys[0]] if keys else []:
        if name == "position":
            continue
        cells = []
        for k in keys:
            v = stats[k].get(name)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}")
        rows.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return '<table class="stats">' + "".join(rows) + "</table>"


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#111}header{padding:8px 14px;background:#f3f4f6}
h1{font-size:18px;margin:0 0 4px}.plots{display:flex;gap:16px;flex-wrap:wrap;padding:8px 14px}
svg .ax{stroke:#999}svg .t{font-size:12px;font-weight:600}svg .l{font-size:10px;fill:#444}
table.stats{border-collapse:collapse;font-size:12px}table.stats td,table.stats th{padding:1px 6px;border-bottom:1px solid #eee}
main{display:flex;gap:12px;padding:8px 14px}#side{width:330px;flex:none}#list{max-height:70vh;overflow:auto}
.row{padding:3px 6px;border-bottom:1px solid #eee;cursor:pointer;display:flex;gap:8px}.row:hover,.row.sel{background:#eef2ff}
.badge{border-radius:3px;padding:0 4px;color:#fff;font-size:12px}.r0{background:#dc2626}.r1{background:#2563eb}
#view{flex:1;min-width:0}.sample{white-space:pre-wrap;font:13px/1.6 ui-monospace,monospace;border:1px solid #ddd;padding:8px;margin-bottom:12px}
.tok{cursor:default}.tok.ans{outline:1px dotted #16a34a}.tok.pin{outline:2px solid #111}
#tip{position:fixed;display:none;background:#fff;border:1px solid #999;box-shadow:0 2px 8px #0003;padding:6px;font-size:12px;z-index:9;max-width:460px}
#tip table{border-collapse:collapse}#tip td{padding:0 5px;font-family:ui-monospace,monospace}
pre.ctx{white-space:pre-wrap;max-height:240px;overflow:auto;background:#f9fafb;padding:6px;font-size:12px}
#detail{font-size:12px}.controls label{display:block;margin:3px 0}
"""

JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const S = D.samples, STR = D.strings, CHUNK = 2000;
const $ = (id) => document.getElementById(id);
const show = (t) => JSON.stringify(t).slice(1, -1).replace(/ /g, '\u00b7');
let scale = D.scale.p99, current = null;
function color(k) { const a = Math.min(1, k / scale); return a < 0.02 ? '' : `rgba(220,38,38,${a.toFixed(3)})`; }
function filtered() {
  const r = $('fr').value, min = parseFloat($('fk').value), key = $('fs').value;
  const out = S.filter(s => (r === 'all' || String(s.r) === r) && s.kl_mean >= min);
  const by = {mean: s => -s.kl_mean, max: s => -s.kl_max, len: s => -s.n, index: s => s.i}[key];
  return out.sort((a, b) => by(a) - by(b));
}
function renderList() {
  const list = $('list'); list.textContent = '';
  const rows = filtered();
  $('count').textContent = `${rows.length} of ${S.length} samples`;
  for (const s of rows) {
    const d = document.createElement('div');
    d.className = 'row' + (current === s.i ? ' sel' : ''); d.dataset.index = s.i; d.dataset.tokens = s.n;
    d.innerHTML = `<span class="badge r${s.r}">r=${s.r}</span><span>#${s.problem_index}.${s.sample_index}</span>` +
      `<span>${s.n} tok</span><span>KL ${s.kl_mean.toFixed(4)}</span><span>max ${s.kl_max.toFixed(3)}</span>`;
    d.onclick = () => select(s.i);
    list.appendChild(d);
  }
}
function renderTokens(box, s, done) {
  let i = 0; const ans = new Set(s.answer);
  function step() {
    const frag = document.createDocumentFragment(), end = Math.min(s.n, i + CHUNK);
    for (; i < end; i++) {
      const sp = document.createElement('span');
      sp.className = ans.has(i) ? 'tok ans' : 'tok'; sp.dataset.i = i; sp.textContent = s.tokens[i];
      const c = color(s.kl[i]); if (c) sp.style.background = c;
      frag.appendChild(sp);
    }
    box.appendChild(frag);
    if (i < s.n) setTimeout(step, 0);
    else { box.dataset.tokens = box.querySelectorAll('.tok').length; box.dataset.rendered = 'done'; if (done) done(); }
  }
  step();
}
function sparkline(s) {
  const w = 600, h = 40, n = s.n, step = Math.max(1, Math.ceil(n / w)), pts = [];
  for (let i = 0; i < n; i += step) { let m = 0; for (let j = i; j < Math.min(n, i + step); j++) m = Math.max(m, s.kl[j]);
    pts.push(`${(i / Math.max(1, n - 1) * w).toFixed(1)},${(h - Math.min(1, m / D.scale.max) * h).toFixed(1)}`); }
  return `<svg width="${w}" height="${h}"><polyline fill="none" stroke="#dc2626" points="${pts.join(' ')}"/></svg>`;
}
function esc(t) { const d = document.createElement('div'); d.textContent = t; return d.innerHTML; }
function sampleBox(s) {
  const wrap = document.createElement('section');
  wrap.innerHTML = `<h3><span class="badge r${s.r}">r=${s.r}</span> problem ${s.problem_index}, sample ${s.sample_index}, ` +
    `step ${s.step}: ${s.n} tokens${s.num_tokens > s.n ? ` (of ${s.num_tokens})` : ''}, mean KL ${s.kl_mean}</h3>` +
    `<div>KL over the response (max per pixel) ${sparkline(s)}</div>` +
    `<details><summary>teacher context (${esc(s.context_name)})</summary><pre class="ctx">${esc(s.context)}</pre></details>` +
    (s.problem ? `<details><summary>problem</summary><pre class="ctx">${esc(s.problem)}</pre></details>` : '');
  const box = document.createElement('div');
  box.className = 'sample'; box.dataset.index = s.i; box.dataset.n = s.n;
  box.addEventListener('mouseover', (e) => { const t = e.target.closest('.tok'); if (t) tip(e, s, +t.dataset.i); });
  box.addEventListener('mouseout', () => { $('tip').style.display = 'none'; });
  box.addEventListener('click', (e) => { const t = e.target.closest('.tok'); if (t) pin(t, s, +t.dataset.i); });
  wrap.appendChild(box);
  return [wrap, box];
}
function topTable(s, i) {
  const rows = [];
  for (let j = 0; j < Math.max(s.tti[i].length, s.sti[i].length); j++) {
    const t = s.tti[i][j], u = s.sti[i][j];
    rows.push(`<tr><td>${t === undefined ? '' : esc(show(STR[t] ?? String(t)))}</td><td>${t === undefined ? '' : s.ttp[i][j].toFixed(3)}</td>` +
      `<td>${u === undefined ? '' : esc(show(STR[u] ?? String(u)))}</td><td>${u === undefined ? '' : s.stp[i][j].toFixed(3)}</td></tr>`);
  }
  return `<b>token ${i}</b> ${esc(show(s.tokens[i]))} &nbsp; KL ${s.kl[i]} &nbsp; log p teacher ${s.tlp[i]} / student ${s.slp[i]}` +
    `<table><tr><th colspan=2>teacher top-5</th><th colspan=2>student top-5</th></tr>${rows.join('')}</table>`;
}
function tip(e, s, i) {
  const t = $('tip'); t.innerHTML = topTable(s, i); t.style.display = 'block';
  t.style.left = Math.min(e.clientX + 12, window.innerWidth - 470) + 'px'; t.style.top = (e.clientY + 14) + 'px';
}
function pin(el, s, i) {
  document.querySelectorAll('.tok.pin').forEach(x => x.classList.remove('pin')); el.classList.add('pin');
  $('detail').innerHTML = topTable(s, i) + `<div>scored after the teacher context (${esc(s.context_name)}), its end:</div>` +
    `<pre class="ctx">${esc(s.context.slice(-1500))}</pre>`;
  const pre = $('detail').querySelector('pre'); pre.scrollTop = pre.scrollHeight;
}
function select(i, then) {
  current = i; renderList(); const view = $('view'); view.textContent = '';
  const [wrap, box] = sampleBox(S[i]); view.appendChild(wrap); renderTokens(box, S[i], then && (() => then(box)));
}
function renderAll() {
  const view = $('view'); view.textContent = ''; const rows = filtered(); let k = 0;
  (function next() { if (k >= rows.length) { view.dataset.rendered = 'all'; return; }
    const [wrap, box] = sampleBox(rows[k++]); view.appendChild(wrap); renderTokens(box, rows[k - 1], next); })();
}
$('fk').max = Math.max(0, ...S.map(s => s.kl_mean)); $('fk').step = ($('fk').max / 100) || 0.01;
$('fk').oninput = () => { $('fkv').textContent = (+$('fk').value).toFixed(4); renderList(); };
$('fr').onchange = renderList; $('fs').onchange = renderList;
$('sc').onchange = () => { scale = D.scale[$('sc').value]; if (current !== null) select(current); };
$('all').onclick = renderAll;
renderList();
const pinned = /^#tok=(\d+):(\d+)$/.exec(location.hash);  // #tok=SAMPLE:TOKEN pins a token (screenshots)
if (location.hash === '#all') renderAll();
else if (pinned && S[+pinned[1]]) select(+pinned[1], (box) => {
  const el = box.querySelector(`.tok[data-i="${pinned[2]}"]`); if (el) pin(el, S[+pinned[1]], +pinned[2]); });
else if (S.length) select(filtered()[0]?.i ?? 0);
"""


def build_token_page(
    records: Sequence[DumpRecord],
    stats: Mapping[str, Any] | None = None,
    title: str = "SD-Zero token dump",
    meta: Mapping[str, Any] | None = None,
) -> str:
    """The page's HTML (module docstring); `stats` default: `compute_localization_stats(records)`."""
    stats = compute_localization_stats(records) if stats is None else stats
    data = json.dumps(page_data(records), ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    described = " &middot; ".join(
        f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in (meta or {}).items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1><div>{described}</div></header>
<div class="plots">{_svg_profile(stats)}{_svg_bars(stats)}{_stats_table(stats)}</div>
<main><div id="side"><div class="controls">
<label>r <select id="fr"><option value="all">all</option><option value="0">r=0 (wrong)</option><option value="1">r=1 (correct)</option></select></label>
<label>min mean KL <input id="fk" type="range" min="0" value="0"> <span id="fkv">0</span></label>
<label>sort <select id="fs"><option value="mean">mean KL</option><option value="max">max KL</option><option value="len">length</option><option value="index">dump order</option></select></label>
<label>colour scale <select id="sc"><option value="p99">99th percentile KL</option><option value="max">max KL</option></select></label>
<button id="all">render all listed samples</button> <span id="count"></span></div>
<div id="list"></div><div id="detail"></div></div><div id="view"></div></main><div id="tip"></div>
<script type="application/json" id="data">{data}</script>
<script>{JS}</script></body></html>
"""


def save_token_page(
    path: str | Path,
    records: Sequence[DumpRecord],
    stats: Mapping[str, Any] | None = None,
    title: str = "SD-Zero token dump",
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write `build_token_page(...)` to `path` atomically; returns the path."""
    atomic_write_text(path, build_token_page(records, stats, title, meta))
    return Path(path)


def main(argv: list[str] | None = None) -> Path:
    """`python -m self_distillation.token_page DUMP.jsonl.gz [OUT.html]` (default: DUMP with .html)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m self_distillation.token_page DUMP.jsonl.gz [OUT.html]")
    dump = Path(args[0])
    out = Path(args[1]) if len(args) > 1 else dump.with_name(dump.name.removesuffix(".jsonl.gz") + ".html")
    header, records = load_dump(dump)
    meta = {k: header[k] for k in ("step", "teacher_context", "divergence") if k in header}
    path = save_token_page(out, records, title=f"token dump {dump.name}", meta=meta)
    print(path)
    return path


if __name__ == "__main__":
    main()
