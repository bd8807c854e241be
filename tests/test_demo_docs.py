"""`make docs`: the README block and docs/demo.md are written from a demo report, never by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import demo_docs


def _study(tmp_path, with_law: bool = True):
    report = tmp_path / "demo_cpu" / "report"
    (report / "plots").mkdir(parents=True)
    (report / "plots" / "loss_vs_params.png").write_bytes(b"\x89PNG fake")
    pd.DataFrame(
        {
            "kind": ["tokenizer", "var", "var", "var"],
            "depth": [None, 1, 2, 3],
            "params_blocks": [None, 1.2e5, 6.0e5, 1.9e6],
            "final_step": [800, 256, 300, 344],
            "final:val/L_mean": [None, 3.66, 3.32, 3.15],
            "final:eval/kid": [None, 0.061, 0.054, 0.049],
            "final:eval/kid_std": [None, 0.0036, 0.0033, 0.0035],
            "final:eval/fid": [None, 132.5, 123.9, 120.5],
        }
    ).to_csv(report / "runs.csv", index=False)
    rows = [{"target": "val/L_mean", "x": "params_blocks", "form": "power_law", "law": "L = (5e3 N)^-0.08", "r": -0.99}]
    pd.DataFrame(rows if with_law else [], columns=["target", "x", "form", "law", "r"]).to_csv(
        report / "fits.csv", index=False
    )
    (tmp_path / "demo_cpu" / "wall_seconds").write_text("612\n")
    return tmp_path / "demo_cpu"


def test_docs_are_written_from_the_report_and_only_between_the_markers(tmp_path):
    study = _study(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{demo_docs.BEGIN}\nold\n{demo_docs.END}\nbottom\n")
    (docs / "demo.md").write_text(f"# head kept\n\n{demo_docs.RESULTS}\nold results\n")
    assert demo_docs.main(["--study", str(study), "--docs", str(docs), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("top\n") and text.endswith("bottom\n") and "old" not in text
    assert "`L = (5e3 N)^-0.08` (r = -0.990)" in text and "10 minutes" in text
    demo = (docs / "demo.md").read_text()
    assert demo.startswith("# head kept") and "old results" not in demo
    assert "| 3 | 1.9e+06 | 344 |" in demo and "KID decreasing with size: yes" in demo
    assert "strictly decreasing with size: yes" in demo
    assert (docs / "demo_loss_vs_params.png").read_bytes() == b"\x89PNG fake"


def test_a_missing_report_says_to_run_the_demo(tmp_path):
    with pytest.raises(SystemExit, match="run `make demo` first"):
        demo_docs.main(["--study", str(tmp_path / "nothing"), "--docs", str(tmp_path), "--readme", str(tmp_path)])


def test_a_study_without_a_law_says_so(tmp_path):
    summary = demo_docs.summarize(_study(tmp_path, with_law=False))
    assert summary["law"] is None
    assert "no law was fitted" in demo_docs.results_markdown(summary)
