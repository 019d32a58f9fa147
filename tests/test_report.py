"""`amc-mobile report RUN_DIR`: one self-contained HTML (+ Markdown twin) rebuilt from a run folder alone."""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
import torch

from amc_mobile.cli import main
from amc_mobile.compare import run_compare
from amc_mobile.report import Code, Heading, Image, build_report, write_report
from amc_mobile.runs import write_manifest
from device import Device, Fingerprint, LatencyStats, MeasureConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class EagerCpuDevice(Device):
    """PyTorch eager forwards on this CPU, timed with perf_counter."""

    uri = "eager-cpu"

    def fingerprint(self, config=None):
        return Fingerprint(kind="eager", hardware="Report Test CPU", runtime=f"torch-{torch.__version__}",
                           backend="eager-fp32", threads=1, extra={"note": "test device"})

    def measure(self, candidates, config=MeasureConfig(), progress=None):
        out = []
        for c in candidates:
            samples = []
            with torch.inference_mode():
                for _ in range(config.iterations):
                    t0 = time.perf_counter()
                    c.module.eval()(c.example_input)
                    samples.append((time.perf_counter() - t0) * 1e3)
            out.append(LatencyStats.from_samples(c.name, samples))
        return out


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def small_png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1, 2], [1, 0, 2])
    fig.savefig(path)
    plt.close(fig)
    return path


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "compare-1"
    argv = ["amc-mobile", "compare", "resnet20", "plain20", "--devices", "eager-cpu", "cuda:0"]
    run_compare(["resnet20", "plain20"], [EagerCpuDevice(), "cuda:0"], MeasureConfig(warmup=0, iterations=2),
                out=out, log=None, argv=argv, report=False)
    return out


def test_report_rebuilt_from_compare_folder(compare_run, capsys):
    assert not (compare_run / "report.html").exists()
    assert main(["report", str(compare_run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(compare_run / "report.html"), str(compare_run / "report.md")]
    html = (compare_run / "report.html").read_text()
    manifest = json.loads((compare_run / "run.json").read_text())
    # the exact command, the versions, the fingerprint, the figures
    assert "amc-mobile compare resnet20 plain20 --devices eager-cpu cuda:0" in html
    for package, version in manifest["versions"].items():
        assert f"<td>{package}</td><td>{version}</td>" in html
    assert manifest["versions"]["torch"] == torch.__version__
    assert "Report Test CPU" in html and "eager-fp32" in html and "test device" in html
    pngs = embedded_pngs(html)
    assert len(pngs) >= 2 and all(p[:8] == PNG_MAGIC for p in pngs)
    assert (compare_run / "speedup.png").read_bytes() in pngs
    # self-contained: no reference to a file outside the HTML
    assert not re.search(r'<img[^>]+src="(?!data:)', html) and "<link" not in html and "<script" not in html
    assert "Latency and speedup" in html and "cuda:0" in html
    md = (compare_run / "report.md").read_text()
    assert "](speedup.png)" in md and "amc-mobile compare resnet20 plain20" in md


def test_report_is_rebuilt_the_same_from_the_folder_alone(compare_run, tmp_path):
    import shutil

    copy = tmp_path / "moved"
    shutil.copytree(compare_run, copy)
    for name in ("report.html", "report.md"):
        (copy / name).unlink(missing_ok=True)
    html_path, md_path = write_report(copy)
    assert html_path.exists() and md_path.exists()
    assert "Report Test CPU" in html_path.read_text()


def test_folder_without_run_json_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "numbers.csv").write_text("a,b\n1,2\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("amc-mobile: error:") and "run.json is missing" in err and err.count("\n") == 1
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "run.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_unknown_kind_gets_every_file(tmp_path):
    write_manifest(tmp_path, "mystery", ["amc-mobile", "mystery", "--flag"],
                   fingerprint={"kind": "local", "hardware": "Some CPU", "runtime": "executorch-1.4.1",
                                "backend": "xnnpack", "threads": 1, "affinity": None, "extra": {}})
    rows = "\n".join(f"{i},{i * 0.5},<b>x{i}</b>" for i in range(120))
    (tmp_path / "table.csv").write_text("step,value,label\n" + rows + "\n")
    small_png(tmp_path / "curve.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "info.json").write_text(json.dumps({"alpha": 1, "nested": {"beta": [1, 2, 3]}}))
    (tmp_path / "broken.csv").write_text('a,b\n"unterminated\n')
    html_path, _ = write_report(tmp_path)
    html = html_path.read_text()
    assert "No specific section for kind &#x27;mystery&#x27;" in html
    assert "showing the first 50 of 120 rows" in html
    assert "<td class=\"num\">49</td>" in html and "<td class=\"num\">50</td>" not in html
    assert "&lt;b&gt;x1&lt;/b&gt;" in html and "<b>x1</b>" not in html  # escaped
    assert len(embedded_pngs(html)) == 1
    assert "sub/info.json" in html and "&quot;beta&quot;" in html
    assert "amc-mobile mystery --flag" in html and "Some CPU" in html


def test_search_kind_best_policy_and_reward_curve(tmp_path):
    write_manifest(tmp_path, "search", ["amc-mobile", "search", "--model", "resnet20"])
    header = "episode,phase,reward,accuracy,cost,cost_ratio,channels\n"
    lines = [f"{e},{'warmup' if e < 3 else 'explore'},{-1 + e * 0.1:.3f},{0.5 + e * 0.01:.3f},{100 - e},"
             f"{0.5 + (e % 3) * 0.01:.3f},\"{{\"\"1\"\": {e}}}\"" for e in range(12)]
    lines.append("12,explore,,,,,\"{}\"")  # a discarded episode: empty reward
    (tmp_path / "episodes.csv").write_text(header + "\n".join(lines) + "\n")
    (tmp_path / "best_policy.json").write_text(json.dumps({
        "episode": 11, "reward": 0.1, "accuracy": 0.61, "cost_ratio": 0.5,
        "preserve_ratios": [0.5, 0.25], "channels": {"1": 8, "4": 4},
        "layers": {"layer1.0.conv2": {"group": 1, "kept": 8, "size": 16, "ratio": 0.5},
                   "layer2.0.conv2": {"group": 4, "kept": 4, "size": 16, "ratio": 0.25}},
    }))
    (tmp_path / "summary.json").write_text(json.dumps({
        "best": {"episode": 11}, "setup": {"model": "resnet20"},
        "measured": {"speedup": 1.8, "fingerprint": {"kind": "local", "hardware": "Search CPU",
                                                     "runtime": "executorch-1.4.1", "backend": "xnnpack",
                                                     "threads": 1, "affinity": None, "extra": {}}}}))
    html = build_report_html(tmp_path)
    assert "Best policy" in html and "layer2.0.conv2" in html
    assert "13 episodes; best reward 0.1" in html
    assert "1.80\u00d7 faster" in html and "Search CPU" in html  # the fingerprint inside summary.json
    assert (tmp_path / "report_reward_curve.png").exists()  # no reward PNG in the folder: drawn from the CSV
    assert len(embedded_pngs(html)) == 1


def test_missing_files_of_a_kind_are_a_note_not_an_error(tmp_path):
    write_manifest(tmp_path, "search", ["amc-mobile", "search"])
    html = build_report_html(tmp_path)
    assert "No best-policy, reward-curve or episode file found" in html
    write_manifest(tmp_path, "compare", ["amc-mobile", "compare", "resnet20"])
    report = build_report(tmp_path)  # a compare folder that died before its CSV
    headings = [b.text for b in report.blocks if isinstance(b, Heading)]
    assert headings[0] == "Run" and "Versions" in headings
    assert "Latency and speedup" not in headings and not any(isinstance(b, Image) for b in report.blocks)
    assert any(isinstance(b, Code) and b.text == "amc-mobile compare resnet20" for b in report.blocks)


def build_report_html(run_dir) -> str:
    html_path, md_path = write_report(run_dir)
    assert md_path.exists()
    return html_path.read_text()
