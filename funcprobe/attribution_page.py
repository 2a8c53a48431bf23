"""A self-contained HTML page of one ``funcprobe attribute`` run: which tokens drive the step's first-order entropy
change (spec §8, on §9's held-out footing when the results say ``basis: heldout``).

``render_attribution_html(results)`` takes the command's results dict (``cli.run_attribute``: "attribution" =
``AttributionResult.to_dict()``, "token_text" [B][G][L], "advantages" [B][G], "rewards", "checkpoint") and returns
one HTML string: inline CSS and a few lines of JS, no network, no external fonts. Every token text and string is
escaped (``html.escape``); the data the sort control reads lives in a ``<script type="application/json">`` block
whose ``<``, ``>`` and ``&`` are written as ``\\u003c`` / ``\\u003e`` / ``\\u0026``, so no token can close the block.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

__all__ = ["render_attribution_html", "batch_text", "token_colour", "visible_token"]

_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def _num(value: Any, digits: int = 4) -> str:
    """A number for a table cell: ``.{digits}g``; "—" for None / NaN / inf."""
    if value is None:
        return "—"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    if not math.isfinite(value):
        return "—"
    return f"{value:.{digits}g}"


def _finite_or_none(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, recursively through lists and dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def token_colour(a: float, scale: float) -> str:
    """Diverging background colour of an attribution a, symmetric around 0: t = sign(a)·√(|a|/scale) ∈ [−1, 1]
    (scale = the batch's max |a|; the square root keeps the heavy tail from washing the rest out). t < 0 (the token
    pushes entropy down) is blue, t > 0 (up) is red, 0 is white. Returns a CSS ``rgb(...)``."""
    t = 0.0 if scale <= 0 or not math.isfinite(a) else max(-1.0, min(1.0, math.copysign(math.sqrt(abs(a) / scale),
                                                                                      a)))
    target = (33, 102, 172) if t < 0 else (178, 24, 43)  # ColorBrewer RdBu ends
    w = abs(t)
    r, g, b = (round(255 + (c - 255) * w) for c in target)
    return f"rgb({r},{g},{b})"


def visible_token(text: str) -> tuple[str, bool]:
    """(shown text, whether it was changed): spaces/newlines/tabs as ␣ ↵ ⇥, an empty decode as ∅."""
    if text == "":
        return "∅", True
    shown = "".join(_VISIBLE.get(ch, ch) for ch in text)
    return shown, shown != text


def _json_block(data: Any) -> str:
    text = json.dumps(_finite_or_none(data), ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _get(nested, *index, default=None):
    try:
        for i in index:
            nested = nested[i]
        return nested
    except (IndexError, KeyError, TypeError):
        return default


def _baseline_gain(results: dict, att: dict) -> float | None:
    """The unchanged step's first-order objective gain Ȳ·Δθ, when the results carry it."""
    for source in (att, results):
        if source.get("objective_gain") is not None:
            return float(source["objective_gain"])
    for name in ("none", "baseline"):
        row = att.get("interventions", {}).get(name)
        if row and row.get("objective_gain") is not None:
            return float(row["objective_gain"])
    return None


def _summary_tables(att: dict) -> str:
    summary = att.get("summary") or {}
    corr = summary.get("correlations") or {}
    eta_text = (f"η_g = {_num(att.get('eta_g'))}" if att.get("eta_g") is not None
                else "1 (per-group learning rates)")
    parts = ["<h2>Agreement with the proxies</h2>",
             f"<p class='note'>Over the {html.escape(str(summary.get('tokens', '?')))} response tokens. The covariance "
             f"proxy is Cui et al.'s −η·cov (η = {html.escape(eta_text)}); the entropy proxy is the next-token entropy "
             f"H(π(·|t<sub>&lt;k</sub>)).</p>",
             "<table class='num'><tr><th>a vs</th><th>Pearson</th><th>Spearman</th></tr>",
             f"<tr><td>−η·cov</td><td>{_num(corr.get('pearson_cov'))}</td><td>{_num(corr.get('spearman_cov'))}</td></tr>",
             f"<tr><td>entropy</td><td>{_num(corr.get('pearson_entropy'))}</td>"
             f"<td>{_num(corr.get('spearman_entropy'))}</td></tr></table>"]
    top_q = summary.get("top_q") or {}
    if top_q:
        down, up = summary.get("down_total"), summary.get("up_total")
        parts.append("<h3>Top-q tokens: how much of the downward push they carry, and overlap with a's own top set</h3>"
                     "<p class='note'>Tokens pushing entropy down sum to "
                     f"{_num(-down if down is not None else None)}, those pushing it up to {_num(up)}; the gradient "
                     "term is what is left of the two. Each share is the part of the downward push (Σ max(−a, 0)) "
                     "carried by the top ⌈q·T⌉ tokens of a ranking (1 = all of it).</p>"
                     "<table class='num'><tr><th>q</th><th>k tokens</th><th>share, top by −a</th>"
                     "<th>share, top by cov</th><th>share, top by entropy</th><th>Jaccard(a, cov)</th>"
                     "<th>Jaccard(a, entropy)</th></tr>")
        for q, row in top_q.items():
            parts.append(f"<tr><td>{html.escape(str(q))}</td><td>{_num(row.get('k'))}</td>"
                         f"<td>{_num(row.get('share_down_a'))}</td><td>{_num(row.get('share_down_cov'))}</td>"
                         f"<td>{_num(row.get('share_down_entropy'))}</td><td>{_num(row.get('jaccard_cov'))}</td>"
                         f"<td>{_num(row.get('jaccard_entropy'))}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)


def _interventions_table(results: dict, att: dict) -> str:
    rows = att.get("interventions") or {}
    if not rows:
        return ""
    base_h = att.get("deltaH1")
    base_gain = _baseline_gain(results, att)
    realised_h, realised_se = att.get("realised_delta_h"), att.get("realised_se")
    base_realised = "—" if realised_h is None else _num(realised_h) + (
        "" if realised_se is None else f" ± {_num(realised_se, 2)}")
    heldout = att.get("basis") == "heldout"
    name = "δĤ₁(E)" if heldout else "δH₁"
    paired_note = (" “ΔĤ − δĤ₁(E)” pairs each step's realised change with its prediction on the same evaluation "
                   "prompts (± the paired SE; ✗ marks an importance-sampling estimate flagged unreliable)."
                   if heldout else "")
    parts = ["<h2>Token-selection interventions</h2>",
             f"<p class='note'>Each row re-runs the step with a token mask on its cotangent: {name} of the changed step, "
             "realised ΔĤ on the evaluation batch (± SE), and the first-order gain of the original objective. "
             f"“Entropy kept per objective given up” = ({name}′ − {name}) / (gain − gain′), predicted; and the same from the "
             "realised changes, (ΔĤ′ − ΔĤ) / (gain − gain′). Where the two disagree, trust the realised one only "
             f"beyond its SEs (the rows share one evaluation batch); {name}′ includes the optimizer-state term, which "
             "grows when a smaller gradient shrinks AdamW's v′"
             + ("" if base_gain is not None else
                " — needs the unchanged step's objective gain, which these results do not carry") + "."
             + paired_note + "</p>",
             f"<table class='num'><tr><th>intervention</th><th>tokens kept</th><th>{name}</th><th>realised ΔĤ</th>"
             + ("<th>ΔĤ − δĤ₁(E)</th>" if heldout else "")
             + "<th>objective gain</th><th>entropy kept per objective given up: predicted</th><th>realised</th></tr>",
             f"<tr class='base'><td>(unchanged step)</td><td>all</td><td>{_num(base_h)}</td><td>{base_realised}</td>"
             + (f"<td>{_paired_cell(att.get('paired') or {})}</td>" if heldout else "")
             + f"<td>{_num(base_gain)}</td><td>—</td><td>—</td></tr>"]
    for name, row in rows.items():
        realised = row.get("realised_delta_h")
        realised_text = _num(realised) + ("" if realised is None or row.get("realised_se") is None
                                          else f" ± {_num(row.get('realised_se'), 2)}")
        ratio = realised_ratio = None
        if base_gain is not None and row.get("objective_gain") is not None:
            given_up = base_gain - float(row["objective_gain"])
            if given_up != 0 and base_h is not None and row.get("deltaH1") is not None:
                ratio = (float(row["deltaH1"]) - float(base_h)) / given_up
            if given_up != 0 and realised is not None and realised_h is not None:
                realised_ratio = (float(realised) - float(realised_h)) / given_up
        kept_tokens = row.get("tokens_kept")
        total = row.get("tokens")
        kept_text = f"{_num(kept_tokens, 6)} / {_num(total, 6)}" if total else _num(kept_tokens, 6)
        parts.append(f"<tr><td>{html.escape(str(name))}</td><td>{kept_text}</td><td>{_num(row.get('deltaH1'))}</td>"
                     f"<td>{realised_text}</td>" + (f"<td>{_paired_cell(row)}</td>" if heldout else "")
                     + f"<td>{_num(row.get('objective_gain'))}</td><td>{_num(ratio)}</td>"
                     f"<td>{_num(realised_ratio)}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _paired_cell(row: dict) -> str:
    """"difference ± paired SE" of a row (spec §9), with ✗ when the realised estimate was flagged unreliable."""
    difference = row.get("paired_difference", row.get("difference"))
    if difference is None:
        return "—"
    se = row.get("paired_se", row.get("se"))
    flag = "" if row.get("realised_reliable", True) else " ✗"
    return _num(difference) + ("" if se is None else f" ± {_num(se, 2)}") + flag


def _tokens_section(results: dict, att: dict) -> tuple[str, dict]:
    tokens = att.get("token") or []
    mask = att.get("response_mask") or []
    cov = att.get("covariance") or []
    entropy = att.get("entropy") or []
    logprobs = att.get("logprobs") or []
    texts = results.get("token_text") or []
    advantages = results.get("advantages")
    rewards = results.get("rewards")
    prompt_texts = results.get("prompt_text") or []
    eta = att.get("eta_g")
    eta = 1.0 if eta is None else float(eta)
    scale = max((abs(v) for p in tokens for s in p for v in s if isinstance(v, (int, float)) and math.isfinite(v)),
                default=0.0)
    abs_total = sum(abs(v) for p in tokens for s in p for v in s if isinstance(v, (int, float)) and math.isfinite(v))
    data: dict = {"scale": scale, "prompts": []}
    parts = ["<h2>Tokens</h2>",
             f"<p class='note'>Each response token coloured by its attribution a (its share of "
             f"{'δĤ₁(E)' if att.get('basis') == 'heldout' else 'δH₁'}'s gradient term): "
             "<span class='sw' style='background:rgb(33,102,172)'>&nbsp;&nbsp;</span> pushes entropy down, "
             "<span class='sw' style='background:rgb(178,24,43)'>&nbsp;&nbsp;</span> pushes it up; intensity √(|a| / "
             f"max |a|), max |a| = {_num(scale)}. ␣ ↵ ⇥ stand for space, newline, tab; ∅ for a token that decodes to "
             "nothing. Hover a token for a, the covariance proxy, entropy and log-probability.</p>",
             "<p><label for='sort'>Order prompts and sequences by contribution: </label>"
             "<select id='sort'><option value='batch'>batch order</option>"
             "<option value='asc'>most negative first (drives entropy down)</option>"
             "<option value='desc'>most positive first</option>"
             "<option value='abs'>largest |contribution| first</option></select></p>",
             "<div id='prompts'>"]
    for b, prompt_tokens in enumerate(tokens):
        prompt_sum = float(_get(att, "prompt", b, default=sum(sum(s) for s in prompt_tokens)))
        prompt_abs = sum(abs(v) for seq in prompt_tokens for v in seq)
        share = prompt_abs / abs_total if abs_total else math.nan
        prompt_data = {"index": b, "contribution": prompt_sum, "sequences": []}
        parts.append(f"<div class='prompt' data-index='{b}' data-contribution='{prompt_sum!r}'>"
                     f"<h3>prompt {b}: contribution {_num(prompt_sum)} (its tokens carry {_num(100 * share, 3)}% "
                     "of Σ|a|)</h3>"
                     + (f"<div class='ptext'>{html.escape(str(prompt_texts[b]))}</div>"
                        if b < len(prompt_texts) and prompt_texts[b] else "")
                     + "<div class='seqs'>")
        for g, seq in enumerate(prompt_tokens):
            seq_sum = float(_get(att, "sequence", b, g, default=sum(seq)))
            advantage = _get(advantages, b, g)
            if isinstance(advantage, list):  # per-token advantages: show the mean over the response
                values = [v for v, m in zip(advantage, _get(mask, b, g, default=[])) if m]
                advantage = sum(values) / len(values) if values else None
            reward = _get(rewards, b, g)
            seq_texts = _get(texts, b, g, default=[])
            prompt_data["sequences"].append({"index": g, "contribution": seq_sum, "advantage": advantage,
                                             "reward": reward, "token_text": [t for t in seq_texts if t]})
            spans = []
            for k, a in enumerate(seq):
                if not _get(mask, b, g, k, default=0):
                    continue
                text = _get(seq_texts, k, default="") or ""
                shown, changed = visible_token(text)
                c = _get(cov, b, g, k, default=math.nan)
                tip = (f"a = {_num(a, 6)}\ncov = {_num(c, 6)}  (−η·cov = {_num(-eta * c, 6)})\n"
                       f"entropy = {_num(_get(entropy, b, g, k), 5)} nats\nlog-prob = {_num(_get(logprobs, b, g, k), 5)}"
                       f"\ntext = {json.dumps(text, ensure_ascii=False)}")
                spans.append(f"<span class='t{' ws' if changed else ''}' style='background:{token_colour(a, scale)}' "
                             f"title='{html.escape(tip, quote=True)}'>{html.escape(shown)}</span>")
            parts.append(f"<div class='seq' data-index='{g}' data-contribution='{seq_sum!r}'>"
                         f"<div class='meta'>seq {g}: Σa {_num(seq_sum)} · advantage {_num(advantage, 3)}"
                         f" · reward {_num(reward, 3)}</div><div class='toks'>{''.join(spans)}</div></div>")
        parts.append("</div></div>")
        data["prompts"].append(prompt_data)
    parts.append("</div>")
    return "\n".join(parts), data


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1300px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 6px} h3{font-size:14px;margin:10px 0 4px}
.note{color:#555;font-size:13px;max-width:1000px}
table.num{border-collapse:collapse;margin:4px 0 10px} table.num td,table.num th{border:1px solid #ccc;padding:3px 8px}
table.num td{text-align:right;font-variant-numeric:tabular-nums} table.num td:first-child{text-align:left}
table.num th{background:#f3f3f3;font-weight:600} tr.base td{color:#555}
.big{font-size:16px} .prompt{border-top:1px solid #ddd;padding:4px 0 8px}
.ptext{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;color:#444;
white-space:pre-wrap;background:#f7f7f7;padding:3px 6px;margin:2px 0 4px;max-height:6em;overflow:auto}
.seq{margin:4px 0 8px 12px} .meta{color:#555;font-size:12px}
.toks{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;line-height:1.9;white-space:normal}
.t{padding:1px 0;border-right:1px solid rgba(0,0,0,.08);white-space:pre} .t.ws{color:#888}
.sw{display:inline-block;width:14px;border:1px solid #999}
"""

_JS = """
(function(){
  var data = JSON.parse(document.getElementById('attribution-data').textContent);
  var sel = document.getElementById('sort');
  function key(mode, el){var c = parseFloat(el.getAttribute('data-contribution'));
    return mode==='asc' ? c : mode==='desc' ? -c : mode==='abs' ? -Math.abs(c) : parseInt(el.getAttribute('data-index'));}
  function order(parent, selector, mode){
    var items = Array.prototype.slice.call(parent.querySelectorAll(':scope > ' + selector));
    items.sort(function(x, y){return key(mode, x) - key(mode, y);});
    items.forEach(function(el){parent.appendChild(el);});}
  sel.addEventListener('change', function(){
    var mode = sel.value, root = document.getElementById('prompts');
    order(root, '.prompt', mode);
    root.querySelectorAll('.seqs').forEach(function(s){order(s, '.seq', mode);});});
  document.getElementById('n-prompts').textContent = data.prompts.length;
})();
"""


def batch_text(batch, tokenizer) -> dict:
    """What the page shows of the update batch beside the attributions: ``token_text`` [B][G][L] (each response
    token decoded alone; "" off the response), ``prompt_text`` [B] (each prompt decoded), ``input_ids``,
    ``advantages`` [B][G] and ``rewards`` (or None). Merge it into the results dict passed to
    :func:`render_attribution_html`."""
    response = batch.response_mask.bool()
    token_text = [[[tokenizer.decode([int(t)]) if bool(r) else "" for t, r in zip(ids, mask)]
                   for ids, mask in zip(rows, masks)] for rows, masks in zip(batch.input_ids, response)]
    prompt_part = batch.attention_mask[:, 0].bool() & ~response[:, 0]
    prompt_text = [tokenizer.decode([int(t) for t, keep in zip(ids, part) if bool(keep)])
                   for ids, part in zip(batch.input_ids[:, 0], prompt_part)]
    return {"input_ids": batch.input_ids.tolist(), "token_text": token_text, "prompt_text": prompt_text,
            "advantages": batch.advantages.tolist(),
            "rewards": None if batch.rewards is None else batch.rewards.tolist()}


def _se_note(att: dict) -> str:
    """" (SE …)" of δH₁ and the gradient term, when the results carry them."""
    se, se_grad = att.get("se_deltaH1"), att.get("se_grad_term")
    if se is None and se_grad is None:
        return ""
    kind, name = (("SE over the evaluation prompts", "δĤ₁(E)") if att.get("basis") == "heldout"
                  else ("jackknife SE", "δH₁"))
    return (f"<br><span class='note'>{kind}: {name} ± {_num(se, 2)}, grad_term ± {_num(se_grad, 2)} — a token's "
            "share of a term this uncertain is a statement about this batch, not about the policy</span>")


def render_attribution_html(results: dict) -> str:
    """The page for one ``funcprobe attribute`` results dict (see the module docstring); returns the HTML text.

    Raises ValueError when ``results`` has no "attribution" dict."""
    att = results.get("attribution") if isinstance(results, dict) else None
    if not isinstance(att, dict):
        raise ValueError("render_attribution_html needs the results dict of `funcprobe attribute` (with an "
                         "'attribution' entry, AttributionResult.to_dict()); got "
                         f"{type(results).__name__}{' without attribution' if isinstance(results, dict) else ''}.")
    checkpoint = results.get("checkpoint") or {}
    tokens_html, data = _tokens_section(results, att)
    heldout = att.get("basis") == "heldout"
    name = "δĤ₁(E)" if heldout else "δH₁"
    title = f"funcprobe attribute — which tokens drive {name}"
    header = (f"<h1>{html.escape(title)}</h1>"
              f"<p class='note'>checkpoint {html.escape(str(checkpoint.get('path', '?')))}"
              f" (step {html.escape(str(checkpoint.get('step', '?')))}) · B = {html.escape(str(att.get('B')))}"
              f" prompts (<span id='n-prompts'>{len(data['prompts'])}</span> shown), G = "
              f"{html.escape(str(att.get('G')))} · units {html.escape(str(att.get('units')))}, U = "
              f"{html.escape(str(att.get('n_units')))} · η<sub>g</sub> = lr(1 − β₁)/(1 − β₁<sup>t</sup>) = "
              f"{_num(att.get('eta_g'))} (AdamW's effective rate on the gradient)</p>"
              f"<p class='big'>{name} = {_num(att.get('deltaH1'), 6)} = grad_term {_num(att.get('grad_term'), 6)} + "
              f"state_term {_num(att.get('state_term'), 6)} <span class='note'>(nats per sequence, for this one step; the "
              "state term belongs to no token"
              + ("; ∇H estimated on the evaluation batch, independent of the step" if heldout else "")
              + ")</span>" + _se_note(att) + "</p>")
    body = "\n".join([header, _summary_tables(att), _interventions_table(results, att), tokens_html])
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n{body}\n"
            f"<script type='application/json' id='attribution-data'>{_json_block(data)}</script>\n"
            f"<script>{_JS}</script>\n</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m funcprobe.attribution_page RESULTS.json PAGE.html``: the page of a saved ``--out`` JSON."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m funcprobe.attribution_page",
                                     description="render the attribution page of `funcprobe attribute --out` JSON")
    parser.add_argument("results", help="the JSON written by `funcprobe attribute ... --out`")
    parser.add_argument("page", help="the HTML file to write")
    args = parser.parse_args(argv)
    try:
        results = json.loads(Path(args.results).read_text(encoding="utf-8"))
        text = render_attribution_html(results)
    except (OSError, ValueError) as error:
        print(f"funcprobe.attribution_page: error: {error}", file=__import__("sys").stderr)
        return 2
    Path(args.page).write_text(text, encoding="utf-8")
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
