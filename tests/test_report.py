"""report.py: the comparison across methods (Markdown, CSV, LaTeX, bar chart), ASMB's per-run plots,
rounding, and a report of a single run directory. Synthetic run directories, no training."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

import report
import sweep

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, name: str, method: str, seed: int, summary: dict | None, rows: list[dict], **config) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "method": method,
        "run": {"seed": seed, "name": name},
        "optim": {"lr": 0.05},
        "teachers": {"models": ["resnet20", "wrn_16_2"], "select": "best"},
        **config,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps({"method": method, **summary}))
    return d


def curve(method: str, values: list[float]) -> list[dict]:
    return [{"phase": method, "epoch": i + 1, "val/acc": v, "train/loss": 2.0 - 0.1 * i} for i, v in enumerate(values)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


TEACHERS = {
    "teacher/resnet20/val_acc": 60.0,
    "teacher/resnet20/test_acc": 61.0,
    "teacher/wrn_16_2/val_acc": 58.0,
    "teacher/wrn_16_2/test_acc": 59.5,
}


def comparison_runs(root: Path) -> None:
    """ce, kd, dkd, fitnet, a kd of both teachers (not single-teacher), aekd and asmb, 2 seeds each, written
    in a scrambled order; accuracies with float32 noise."""
    selected = {
        "asmb": (66.0, 68.0),
        "kd": (62.0, 64.0),
        "ce": (60.0, 61.0),
        "dkd": (63.5, 64.5),
        "fitnet": (61.0, 61.0),
        "aekd": (64.0, 66.0),
    }
    for method, accs in selected.items():
        for seed, acc in enumerate(accs):
            summary = {
                "best/test_acc": acc - 1.4305e-6,
                "last/test_acc": acc - 1.0 + 2.38e-7,
                "wall_time_s": 10.123,
                "best/val_acc": acc + (1.0 if method != "kd" else 3.0),
            }  # kd: best on val, not on test
            if method != "ce":
                summary.update(TEACHERS)
            if method == "asmb":
                summary.update({"synergy/test_acc": 70.0 + seed, "ensemble/test_acc": 65.0})
            write_run(root, f"{method}-s{seed}", method, seed, summary, curve(method, [40.0, 50.0]))
    for seed in (0, 1):  # kd of the averaged teachers: a multi-teacher setting, not the best single
        write_run(
            root,
            f"kd-both-s{seed}",
            "kd",
            seed,
            {"best/test_acc": 70.0, "last/test_acc": 69.0, "best/val_acc": 72.0, **TEACHERS},
            curve("kd", [40.0, 50.0]),
            teachers={"models": ["resnet20", "wrn_16_2"], "select": "both"},
        )


def test_comparison_table_orders_families_and_computes_gains(tmp_path):
    comparison_runs(tmp_path / "runs")
    out = tmp_path / "out"
    assert sweep.main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    rows = read_csv(out / "comparison.csv")
    assert [r["method"] for r in rows] == ["ce", "kd", "kd", "dkd", "fitnet", "aekd", "asmb"]
    assert [r["family"] for r in rows] == ["baseline", "logit", "logit", "logit", "feature", "multi-teacher", "asmb"]
    by = {r["setting"]: r for r in rows}
    assert set(by) == {"ce", "kd (teachers.select=best)", "kd (teachers.select=both)", "dkd", "fitnet", "aekd", "asmb"}
    asmb = by["asmb"]
    assert asmb["n"] == "2" and asmb["selected mean"] == "67.0" and asmb["selected std"] == "1.41"
    assert asmb["last mean"] == "66.0"
    assert asmb["gain vs ce"] == "6.5"  # 67 - 60.5
    assert asmb["gain vs ce se"] == "1.12"  # sqrt(1.41^2 / 2 + 0.71^2 / 2): a resolved gain is above ~2 SE
    # the best single-teacher method is kd (best mean val accuracy: 66; test 63), not dkd (best on test: 64) nor
    # kd-both (70, a multi-teacher setting)
    assert asmb["gain vs best single"] == "4.0"
    assert by["kd (teachers.select=best)"]["gain vs best single"] == "" and by["ce"]["gain vs ce"] == ""
    assert by["dkd"]["gain vs best single"] == "1.0"
    assert by["kd (teachers.select=both)"]["gain vs best single"] == "7.0"
    assert asmb["synergy/test_acc mean"] == "70.5" and asmb["ensemble/test_acc mean"] == "65.0"
    assert asmb["teacher/resnet20/test_acc mean"] == "61.0" and asmb["teacher/wrn_16_2/test_acc mean"] == "59.5"
    assert by["ce"]["teacher/resnet20/test_acc mean"] == ""  # ce has no teachers

    md = (out / "comparison.md").read_text().splitlines()
    assert md[0] == (
        "| method | n | selected | last | gain vs ce | gain vs best single | teacher resnet20 (test) "
        "| teacher wrn_16_2 (test) | ensemble (test) | synergy (test) |"
    )
    assert (
        "| asmb | 2 | 67.00 ± 1.41 | 66.00 ± 1.41 | +6.50 ± 1.12 | +4.00 ± 1.41 | 61.00 ± 0.00 | 59.50 ± 0.00 "
        "| 65.00 ± 0.00 | 70.50 ± 0.71 |"
    ) in md
    tex = (out / "comparison.tex").read_text()
    assert tex.startswith(r"\begin{tabular}{lrrrrrrrrr}") and r"\bottomrule" in tex
    assert r"asmb & 2 & $67.00 \pm 1.41$ & $66.00 \pm 1.41$ & $+6.50 \pm 1.12$ & $+4.00 \pm 1.41$" in tex
    assert r"teacher wrn\_16\_2 (test)" in tex and tex.count(r"\midrule") == 1 + 4  # header + between 5 families
    report_md = (out / "report.md").read_text()
    assert "## Comparison" in report_md and "| asmb | 2 | 67.00 ± 1.41 |" in report_md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "comparison.png").read_bytes()[:8] == PNG
        assert "![test accuracy per method, mean ± std over seeds](comparison.png)" in report_md


def test_numbers_in_csvs_are_rounded_to_what_they_mean(tmp_path):
    comparison_runs(tmp_path / "runs")
    out = tmp_path / "out"
    assert sweep.main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    runs = {r["run"]: r for r in read_csv(out / "runs.csv")}
    assert runs["asmb-s0"]["best/test_acc"] == "66.0" and runs["asmb-s0"]["last/test_acc"] == "65.0"
    assert runs["asmb-s0"]["wall_time_s"] == "10.1"
    for name in ("runs.csv", "report.csv", "comparison.csv"):
        for row in read_csv(out / name):
            for value in row.values():
                if value.replace(".", "").replace("-", "").isdigit():
                    assert len(value.split(".")[-1]) <= 2 or "." not in value, (name, value)
    assert report.rounded("val/acc", 26.499998569488525) == 26.5
    assert report.rounded("wall_time_s", 14.5138) == 14.5 and report.rounded("optim.lr", 0.012345678) == 0.01235
    assert report.rounded("best/epoch", 6) == 6


def asmb_rows() -> list[dict]:
    """metrics.jsonl of a 2-stage ASMB run (1 phase-A and 2 phase-B epochs per stage), as train.py writes it."""
    rows = [{"phase": "teacher:resnet20", "epoch": 1, "train/loss": 2.5, "val/acc": 12.5}]
    epoch = 0
    for stage in (1, 2):
        epoch += 1
        rows.append(
            {
                "phase": f"asmb:A:s{stage}",
                "epoch": epoch,
                "train/loss": 2.3 - 0.01 * stage,
                "val/synergy_acc": 15.0 + 12.5 * (stage - 1),
            }
        )
        for _ in range(2):
            epoch += 1
            rows.append(
                {
                    "phase": f"asmb:B:s{stage}",
                    "epoch": epoch,
                    "train/loss": 2.7 - 0.1 * epoch,
                    "val/acc": 15.0 + 2.5 * epoch,
                }
            )
        rows.append(
            {
                "phase": "asmb:stage",
                "stage": stage,
                "epoch": epoch,
                "teacher0/acc": 12.5,
                "teacher1/acc": 10.000000149011612,
                "ensemble/acc": 13.0,
                "synergy/acc": 15.0 + 12.5 * (stage - 1),
                "student/acc": 22.5 + 2.5 * (stage - 1),
                "attn/teacher0": 0.51 + 0.1 * stage,
                "attn/teacher1": 0.49 - 0.1 * stage,
            }
        )
    return rows


def test_report_of_a_single_asmb_run_writes_its_plots_next_to_it(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = write_run(
        tmp_path,
        "asmb-run",
        "asmb",
        0,
        {"best/test_acc": 41.0, "last/test_acc": 40.999998, "synergy/test_acc": 13.0, **TEACHERS},
        asmb_rows(),
    )
    assert sweep.main(["report", str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("report.md", "report.csv", "runs.csv", "curves.png", "asmb_stages.png", "run_curves.png"):
        assert str(run_dir / name) in printed
        if name.endswith(".png"):
            data = (run_dir / name).read_bytes()
            assert data[:8] == PNG and len(data) > 10_000
    assert not (run_dir / "comparison.csv").exists()  # one setting: nothing to compare
    md = (run_dir / "report.md").read_text()
    assert "![asmb-run: asmb_stages](asmb_stages.png)" in md and "![asmb-run: run_curves](run_curves.png)" in md


def test_asmb_plots_land_in_each_run_directory_and_the_report_links_them(tmp_path):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    write_run(runs, "asmb-s0", "asmb", 0, {"best/test_acc": 41.0}, asmb_rows())
    write_run(runs, "kd-s0", "kd", 0, {"best/test_acc": 40.0}, curve("kd", [30.0, 35.0]))
    out = tmp_path / "out"
    assert sweep.main(["report", str(runs), "--out", str(out)]) == 0
    assert (runs / "asmb-s0" / "asmb_stages.png").exists() and (runs / "asmb-s0" / "run_curves.png").exists()
    assert not list((runs / "kd-s0").glob("*.png"))  # several runs: per-run plots for ASMB only
    assert "![asmb-s0: asmb_stages](../runs/asmb-s0/asmb_stages.png)" in (out / "report.md").read_text()


def test_curves_use_the_global_epoch():
    rows = asmb_rows()
    assert report.val_acc_by_epoch(rows) == {2: 20.0, 3: 22.5, 5: 27.5, 6: 30.0}  # phase-B epochs, not 1..4
    assert report.phase_kind({"phase": "asmb:A:s2"}) == "A" and report.phase_kind({"phase": "kd"}) is None


def guard_rows(fired: tuple[int, ...]) -> list[dict]:
    """asmb_rows() whose stage rows record the residual guard (`guard/fired`, as train.py logs it)."""
    rows = asmb_rows()
    for r in rows:
        if r["phase"] == "asmb:stage":
            r["guard/fired"] = int(r["stage"] in fired)
            if r["guard/fired"]:
                r["synergy/acc"] = r["ensemble/acc"]  # the residual reset: the synergy is the ensemble
    return rows


def test_asmb_stages_marks_where_the_residual_guard_fired_and_titles_do_not_overlap(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    run = report.Run(
        "a-long-run-name/asmb-resnet8-from-resnet20+wrn_16_2-synthetic-20250101-120000",
        tmp_path,
        {"method": "asmb", "teachers.models": ("resnet20", "wrn_16_2")},
        {},
        guard_rows((1,)),
    )
    stages = [r for r in run.rows if r["phase"] == "asmb:stage"]
    fig = report.asmb_stages_figure(plt, run, stages)
    acc_ax, attn_ax = fig.axes[:2]
    labels = acc_ax.get_legend().get_texts()
    assert report.GUARD_LABEL in [t.get_text() for t in labels]
    (marks,) = [c for c in acc_ax.collections if c.get_label() == report.GUARD_LABEL]
    assert marks.get_offsets().tolist() == [[1.0, 13.0]]  # on stage 1's synergy point only
    assert [t.get_text() for t in acc_ax.texts] == ["guard"]
    assert "guard fired at stage 1" in fig.get_suptitle() and run.name in fig.get_suptitle()
    assert run.name not in acc_ax.get_title()  # the run's name once, in the figure's title
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in (fig._suptitle, acc_ax.title, attn_ax.title)]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    plt.close(fig)
    quiet = report.asmb_stages_figure(
        plt, run, [r for r in report.Run("r", tmp_path, {}, {}, guard_rows(())).rows if r["phase"] == "asmb:stage"]
    )
    assert report.GUARD_LABEL not in [t.get_text() for t in quiet.axes[0].get_legend().get_texts()]
    assert "guard" not in quiet.get_suptitle()
    plt.close(quiet)


def test_report_of_a_single_asmb_run_has_ensemble_and_adapted_ensemble_columns(tmp_path):
    run_dir = write_run(
        tmp_path,
        "asmb-run",
        "asmb",
        0,
        {
            "best/test_acc": 41.0,
            "last/test_acc": 40.5,
            "best/val_acc": 42.0,
            **TEACHERS,
            "ensemble/test_acc": 63.0,
            "adapted_ensemble/test_acc": 64.0,
            "synergy/test_acc": 64.0,
            "asmb/guard_fired": 2,
        },
        guard_rows((1, 2)),
    )
    assert sweep.main(["report", str(run_dir)]) == 0
    md = (run_dir / "report.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| setting |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[columns.index("ensemble/test_acc") :][:4] == [
        "ensemble/test_acc",
        "adapted_ensemble/test_acc",
        "synergy/test_acc",
        "asmb/guard_fired",
    ]
    row = md[md.index(header) + 2]
    assert "| 63.00 | 64.00 | 64.00 | 2.00 |" in row


def compared(method: str, n: int, accs: tuple[float, float], std: float | None) -> report.Compared:
    stats = {"best/test_acc": (accs[0], std), "last/test_acc": (accs[1], std), "best/val_acc": (accs[0], std)}
    return report.Compared(method, method, n, False, stats, {})


def test_comparison_draws_error_bars_only_for_several_seeds():
    plt = pytest.importorskip("matplotlib.pyplot")
    from matplotlib.container import ErrorbarContainer

    fig = report.comparison_figure(plt, [compared("ce", 1, (60.0, 59.0), None), compared("kd", 1, (62.0, 61.0), None)])
    ax = fig.axes[0]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert "one seed" in ax.get_title() and "±" not in ax.get_title()
    plt.close(fig)
    fig = report.comparison_figure(plt, [compared("ce", 1, (60.0, 59.0), None), compared("kd", 3, (62.0, 61.0), 0.5)])
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # kd's selected and last bars; none on ce's single seed
    segments = [seg for c in bars for seg in c.lines[2][0].get_segments()]  # one vertical bar per setting
    assert len(segments) == 2 and all(abs(seg[0][0] - 1.0) < 0.21 for seg in segments)  # at kd (x = 1)
    plt.close(fig)


def test_curves_of_single_phase_methods_are_labelled_by_their_own_epoch(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs, f"kd-s{seed}", "kd", seed, {"best/test_acc": 40.0}, curve("kd", [30.0, 35.0]))
    kd_only = report.group_runs(report.find_runs(runs))
    fig = report.curves_figure(plt, kd_only)
    assert fig.axes[0].get_xlabel() == "epoch"
    plt.close(fig)
    write_run(runs, "asmb-s0", "asmb", 0, {"best/test_acc": 41.0}, asmb_rows())
    fig = report.curves_figure(plt, report.group_runs(report.find_runs(runs)))
    assert "ASMB: global" in fig.axes[0].get_xlabel()
    plt.close(fig)
    run = report.find_runs(runs)[1]  # kd-s0 alone: its run_curves.png
    assert run.name == "kd-s0"
    report.plot_run_curves(plt, run)
    assert (run.path / "run_curves.png").exists()


def test_figures_are_written_atomically_a_failed_render_leaves_no_empty_png(tmp_path, monkeypatch):
    """A report killed or failing while a figure renders leaves the previous PNG (or none), never a 0-byte one:
    the PNG is rendered in memory and renamed into place."""
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "curves.png"
    report.save_figure(fig, path)
    good = path.read_bytes()
    assert good.startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == ["curves.png"]

    def savefig_dies(*args, **kwargs):
        args[0].write(b"\x89PNG half")  # part of the image, then the renderer fails (or a kill)
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", savefig_dies)
    with pytest.raises(KeyboardInterrupt):
        report.save_figure(fig, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    with pytest.raises(KeyboardInterrupt):
        report.save_figure(fig, tmp_path / "new.png")
    assert not (tmp_path / "new.png").exists()
    plt.close(fig)
