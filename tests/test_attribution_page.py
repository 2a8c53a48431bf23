"""The attribution page and plot: well-formed, self-contained HTML in which no token text can inject markup, a JSON
block that round-trips, the sort control, and the CLI's --html/--plot on one tiny real run."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from funcprobe.attribution_page import render_attribution_html, token_colour, visible_token
from funcprobe.report import plot_attribution

EVIL = "</script><script>alert(1)</script>"
AMP = "<b>&amp;"
VOID = {"meta", "br", "img", "hr", "input", "link", "wbr", "col", "area", "base", "source", "track", "embed"}


def synthetic_results() -> dict:
    """B = 2 prompts, G = 2, L = 4 (the last position off the response); Σ a = grad_term."""
    B, G, L = 2, 2, 4
    texts = [[[EVIL, " ", "\n", ""], [AMP, "x'\"y", "ok", ""]], [["a", "b", "c", ""], ["\t", "é", "z", ""]]]
    token = [[[-0.5, 0.1, 0.02, 0.0], [0.3, -0.04, 0.001, 0.0]], [[-1e-3, 2e-3, 0.0, 0.0], [0.05, -0.2, 0.01, 0.0]]]
    mask = [[[1, 1, 1, 0]] * G for _ in range(B)]
    seq = [[sum(s) for s in p] for p in token]
    grad = sum(sum(s) for s in seq)
    filler = [[[0.1 * (k + 1) if k < 3 else 0.0 for k in range(L)] for _ in range(G)] for _ in range(B)]
    attribution = {
        "grad_term": grad, "state_term": -0.01, "deltaH1": grad - 0.01, "eta_g": 1e-5, "n_units": B,
        "units": "prompt", "B": B, "G": G, "prompt": [sum(p) for p in seq], "sequence": seq, "token": token,
        "logprobs": filler, "covariance": filler, "entropy": filler, "cotangent": filler, "response_mask": mask,
        "summary": {"tokens": 12, "grad_term": grad,
                    "correlations": {"pearson_cov": 0.5, "spearman_cov": 0.4, "pearson_entropy": -0.1,
                                     "spearman_entropy": float("nan")},
                    "top_q": {"0.2": {"k": 3, "share_a": 0.9, "share_cov": 0.3, "share_entropy": 0.1,
                                      "jaccard_cov": 0.2, "jaccard_entropy": 0.0}}},
        "interventions": {EVIL: {"tokens_kept": 11.0, "tokens": 12, "deltaH1": -0.2, "objective_gain": 0.7,
                                 "realised_delta_h": -0.19, "realised_se": 0.01}},
        "objective": {}, "timings": {},
    }
    return {"attribution": attribution, "token_text": texts, "advantages": [[1.0, -1.0], [0.5, -0.5]],
            "rewards": [[1.0, 0.0], [0.7, 0.2]], "prompt_text": [EVIL + " 1+1=", "2+2="], "objective_gain": 1.0,
            "checkpoint": {"path": "/tmp/<ckpt>", "step": 2, "base": None}}


class _Checker(HTMLParser):
    """Every opened (non-void) tag closes, in order; collects attribute values and script blocks."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.attrs, self.scripts, self.text = [], [], [], [], []
        self._script = None

    def handle_starttag(self, tag, attrs):
        self.attrs.extend(attrs)
        if tag == "script":
            self._script = (dict(attrs), [])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag == "script" and self._script is not None:
            self.scripts.append((self._script[0], "".join(self._script[1])))
            self._script = None
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self._script is not None:
            self._script[1].append(data)
        else:
            self.text.append(data)


def _check(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    return checker


def test_page_is_well_formed_self_contained_and_escaped():
    results = synthetic_results()
    page = render_attribution_html(results)
    checker = _check(page)
    # Self-contained: no network sources or links, no external fonts.
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", page, re.I)
    assert "@import" not in page and "url(" not in page
    # Injection: the raw strings never appear; the only <script> blocks are the page's two.
    assert EVIL not in page and AMP not in page and "alert(1)</script>" not in page
    assert [attrs.get("type") for attrs, _ in checker.scripts] == ["application/json", None]
    data = json.loads(checker.scripts[0][1])
    assert data["prompts"][0]["sequences"][0]["token_text"][0] == EVIL
    assert data["prompts"][0]["sequences"][1]["token_text"][0] == AMP
    assert [p["contribution"] for p in data["prompts"]] == pytest.approx(results["attribution"]["prompt"])
    # The escaped tokens come back as text (and in the tooltips) after parsing.
    text = "".join(checker.text)
    assert EVIL in text and AMP in text and "x'\"y" in text
    titles = [value for name, value in checker.attrs if name == "title"]
    assert any('"\\n"' in t for t in titles) and any(EVIL in t for t in titles)
    # Whitespace shown visibly; an empty decode as ∅; every response token (12) has a span, none off the response.
    assert "␣" in text and "↵" in text and "⇥" in text
    assert sum(1 for name, value in checker.attrs if name == "class" and value.startswith("t")
               and value.split()[0] == "t") == 12
    # Sort control, header arithmetic, the intervention's name escaped in the table.
    assert "id='sort'" in page and "value='asc'" in page and "addEventListener('change'" in page
    assert "δH₁ = " in page and "grad_term" in page and "state_term" in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in page
    # Prompt text shown (escaped); entropy kept per objective given up: (−0.2 − δH₁) / (1.0 − 0.7).
    assert "2+2=" in text and EVIL + " 1+1=" in text
    ratio = (-0.2 - results["attribution"]["deltaH1"]) / (1.0 - 0.7)
    assert f"<td>{ratio:.4g}</td>" in page


def test_colours_are_symmetric_and_normalised():
    assert token_colour(0.0, 1.0) == "rgb(255,255,255)"
    assert token_colour(1.0, 1.0) == "rgb(178,24,43)" and token_colour(-1.0, 1.0) == "rgb(33,102,172)"
    assert token_colour(5.0, 1.0) == token_colour(1.0, 1.0)  # clipped at the batch's max |a|
    assert token_colour(0.25, 1.0) != token_colour(-0.25, 1.0)
    # Same intensity either side: distance from white is equal in each channel's own range.
    up, down = (tuple(int(v) for v in re.findall(r"\d+", token_colour(s * 0.25, 1.0))) for s in (1, -1))
    assert (255 - up[1]) / (255 - 24) == pytest.approx((255 - down[0]) / (255 - 33), abs=0.01)
    assert visible_token(" a\n") == ("␣a↵", True) and visible_token("x") == ("x", False)
    assert visible_token("") == ("∅", True)


def test_bad_results_raise():
    with pytest.raises(ValueError, match="attribution"):
        render_attribution_html({"token_text": []})
    with pytest.raises(ValueError, match="attribute"):
        plot_attribution({"nothing": 1}, "x.png")


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_attribution(synthetic_results(), tmp_path / "plot.png")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_run) -> Path:
    return max(Path(tiny_run["out"]).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def test_cli_writes_page_and_plot(checkpoint_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from funcprobe.cli import main

    page, plot, out = tmp_path / "page.html", tmp_path / "plot.png", tmp_path / "a.json"
    reward = tmp_path / "length_reward.py"  # rewards that differ: something to attribute
    reward.write_text("def length(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    assert main(["attribute", str(checkpoint_dir), "-B", "2", "-G", "2", "--max-new-tokens", "4", "--quiet",
                 "--reward", f"{reward}:length", "--intervention", "clip_cov:0.2", "--html", str(page), "--plot", str(plot), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    checker = _check(page.read_text(encoding="utf-8"))
    data = json.loads(checker.scripts[0][1])
    att = results["attribution"]
    assert [p["contribution"] for p in data["prompts"]] == att["prompt"]
    n_tokens = sum(m for p in att["response_mask"] for s in p for m in s)
    assert sum(1 for name, value in checker.attrs if name == "class" and value.split()[0] == "t") == n_tokens
    assert math.isfinite(att["deltaH1"]) and "clip_cov:0.2" in page.read_text(encoding="utf-8")
    # The baseline objective gain is Ȳ·Δθ of the unchanged step: positive for an ascent step, and a full-keep
    # mask would reproduce it; clip_cov keeps fewer tokens, so its own gain differs from it.
    assert math.isfinite(results["objective_gain"]) and len(results["prompt_text"]) == 2
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_page_from_saved_json(tmp_path, capsys):
    from funcprobe.attribution_page import main

    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(synthetic_results()))
    assert main([str(saved), str(tmp_path / "page.html")]) == 0
    _check((tmp_path / "page.html").read_text(encoding="utf-8"))
    (tmp_path / "bad.json").write_text('{"token_text": []}')
    assert main([str(tmp_path / "bad.json"), str(tmp_path / "x.html")]) == 2
    assert "attribution" in capsys.readouterr().err
