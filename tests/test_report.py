"""Tests of mtkd_jax.report against hand-computed values and independent numpy statistics."""

import math

import numpy as np
import pytest

from mtkd_jax import report


def _hm(base, novel):  # Independent reference.
    return 0.0 if base == 0 or novel == 0 else 2 / (1 / base + 1 / novel)


def _results(dataset="oxford_pets", seed=1, shots=16, **methods):
    return {"dataset": dataset, "shots": shots, "seed": seed, "methods": methods}


def test_harmonic_mean_matches_hand_values():
    assert report.harmonic_mean(0.8, 0.6) == pytest.approx(0.96 / 1.4, abs=1e-12)
    assert report.harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert report.harmonic_mean(1.0, 0.0) == 0.0
    assert report.harmonic_mean(0.0, 0.0) == 0.0


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_harmonic_mean_rejects_bad_accuracies(bad):
    with pytest.raises(ValueError, match="Received: base="):
        report.harmonic_mean(bad, 0.5)


def test_accuracy_row_adds_hm_only_with_base_and_novel():
    row = report.accuracy_row(0.8, 0.6, 0.7)
    assert list(row) == ["base", "novel", "hm", "all"]
    assert row["hm"] == pytest.approx(_hm(0.8, 0.6))
    assert report.accuracy_row(all=0.42) == {"all": 0.42}
    assert report.accuracy_row(base=0.9) == {"base": 0.9}


def test_accuracy_row_rejects_percentages():
    with pytest.raises(ValueError, match="fractions in \\[0, 1\\].*novel=85.0"):
        report.accuracy_row(0.9, 85.0)


def test_methods_are_ordered_teachers_then_students_by_stage():
    names = ["student_stage2", "my_student", "teacher", "teacher_extra", "student_stage1"]
    names += ["teacher_zero_shot", "student_supervised", "student_stage1_instance_only"]
    assert report.ordered_methods(names) == [
        "teacher_zero_shot",
        "teacher",
        "student_supervised",
        "student_stage1_instance_only",
        "student_stage1",
        "student_stage2",
        "teacher_extra",
        "my_student",
    ]


def test_results_table_prints_percentages_in_stage_order_and_dashes_for_missing():
    results = _results(
        student_stage2={"base": 0.9, "novel": 0.7, "hm": _hm(0.9, 0.7), "all": 0.8},
        teacher={"base": 0.95123, "novel": 0.978, "hm": _hm(0.95123, 0.978), "all": 0.935},
        student_supervised={"all": 0.5},
    )
    lines = report.format_results_table(results).splitlines()
    assert lines[0] == "oxford_pets, 16 shots, seed 1"
    cells = [[cell.strip() for cell in line.split("|")] for line in lines[1:]]
    assert cells[0] == ["method", "base", "novel", "HM", "all"]
    rows = {row[0]: row[1:] for row in cells[2:]}
    assert list(rows) == ["teacher", "student_supervised", "student_stage2"]
    assert rows["teacher"] == ["95.12", "97.80", f"{100 * _hm(0.95123, 0.978):.2f}", "93.50"]
    assert rows["student_supervised"] == ["-", "-", "-", "50.00"]
    assert rows["student_stage2"] == ["90.00", "70.00", "78.75", "80.00"]
    assert len({len(line) for line in lines[1:]}) == 1  # fixed width


def test_results_table_explains_a_dict_without_methods():
    with pytest.raises(ValueError, match='"methods"'):
        report.format_results_table({"dataset": "dtd"})


def test_plot_writes_a_png_with_one_bar_per_accuracy(tmp_path):
    results = _results(
        teacher={"base": 0.9, "novel": 0.8, "hm": _hm(0.9, 0.8), "all": 0.85},
        student_stage1={"all": 0.6},  # no base/novel: one bar
        student_stage2={"base": 0.7, "novel": 0.5, "hm": _hm(0.7, 0.5), "all": 0.6},
    )
    path = tmp_path / "plots" / "results.png"
    figure = report.plot_results(results, path)

    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["results.png"]  # no temporary left
    axes = figure.axes[0]
    bars = [bar for container in axes.containers for bar in container]
    assert len(bars) == 4 + 1 + 4
    assert sorted(round(bar.get_height(), 6) for bar in bars) == sorted(
        round(100 * v, 6) for m in results["methods"].values() for v in m.values()
    )
    assert [t.get_text() for t in axes.get_xticklabels()] == [
        "teacher",
        "student_stage1",
        "student_stage2",
    ]
    assert "oxford_pets" in axes.get_title() and "seed 1" in axes.get_title()


def test_aggregate_gives_mean_and_sample_std_like_numpy():
    base = [0.91, 0.87, 0.95]
    novel = [0.71, 0.75, 0.70]
    runs = [
        _results(seed=s, student_stage2=report.accuracy_row(b, n, (b + n) / 2))
        for s, b, n in zip((1, 2, 3), base, novel, strict=True)
    ]
    runs.append(_results(dataset="dtd", seed=1, teacher={"all": 0.5}))
    stats = report.aggregate(runs)

    pets = stats["oxford_pets"]["student_stage2"]
    for metric, values in {
        "base": base,
        "novel": novel,
        "hm": [_hm(b, n) for b, n in zip(base, novel, strict=True)],
        "all": [(b + n) / 2 for b, n in zip(base, novel, strict=True)],
    }.items():
        assert pets[metric]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert pets[metric]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert pets[metric]["n"] == 3
    assert stats["dtd"] == {"teacher": {"all": {"mean": 0.5, "std": 0.0, "n": 1}}}


def test_aggregate_refuses_mixed_shots_and_repeated_seeds():
    one = _results(seed=1, teacher={"all": 0.5})
    with pytest.raises(ValueError, match="mix shot counts"):
        report.aggregate([one, _results(seed=2, shots=4, teacher={"all": 0.5})])
    with pytest.raises(ValueError, match="seed 1"):
        report.aggregate([one, dict(one)])


def _parse_markdown(table):
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    return rows[0], rows[1], rows[2:]


def test_markdown_table_has_the_paper_shape():
    accuracies = {  # dataset -> seed -> (base, novel) of student_stage2
        "oxford_pets": [(0.90, 0.80), (0.92, 0.78)],
        "dtd": [(0.70, 0.50), (0.74, 0.56)],
    }
    runs = []
    for dataset, per_seed in accuracies.items():
        for seed, (b, n) in enumerate(per_seed, start=1):
            runs.append(
                _results(
                    dataset,
                    seed,
                    teacher=report.accuracy_row(0.95, 0.9, 0.9),
                    student_stage2=report.accuracy_row(b, n, 0.6),
                )
            )
    header, rule, rows = _parse_markdown(report.markdown_table(report.aggregate(runs)))

    assert header == ["Dataset"] + [
        f"{method} {metric}"
        for method in ("teacher", "student_stage2")
        for metric in ("Base", "Novel", "HM")
    ]
    assert len(rule) == len(header)
    assert [row[0] for row in rows] == ["oxford_pets", "dtd", "Average"]
    assert all(len(row) == len(header) for row in rows)

    dtd = np.array(accuracies["dtd"])
    assert rows[1][4] == f"{100 * dtd[:, 0].mean():.2f} ± {100 * dtd[:, 0].std(ddof=1):.2f}"
    hms = [_hm(b, n) for b, n in dtd]
    assert rows[1][6] == f"{100 * np.mean(hms):.2f} ± {100 * np.std(hms, ddof=1):.2f}"
    assert rows[1][1] == "95.00 ± 0.00"

    means = np.array([np.mean(v, axis=0) for v in accuracies.values()])  # [datasets, 2]
    average_base, average_novel = means.mean(axis=0)
    assert rows[2][4:7] == [
        f"{100 * average_base:.2f}",
        f"{100 * average_novel:.2f}",
        f"{100 * _hm(average_base, average_novel):.2f}",
    ]


def test_markdown_table_selects_methods_and_falls_back_to_all_accuracy():
    runs = [
        _results("eurosat", 1, teacher={"all": 0.8}, student_stage2={"all": 0.6}),
        _results("eurosat", 2, teacher={"all": 0.9}, student_stage2={"all": 0.7}),
    ]
    stats = report.aggregate(runs)
    header, _, rows = _parse_markdown(report.markdown_table(stats, methods=["student_stage2"]))
    assert header == ["Dataset", "student_stage2 All"]
    std = math.sqrt(((0.6 - 0.65) ** 2 + (0.7 - 0.65) ** 2) / 1)
    assert rows == [["eurosat", f"65.00 ± {100 * std:.2f}"], ["Average", "65.00"]]
    with pytest.raises(ValueError, match="No results for methods \\['nope'\\]"):
        report.markdown_table(stats, methods=["nope"])


def test_methods_table_has_a_row_per_method_with_all_four_metrics():
    runs = [
        _results("shapes", seed, student_stage2=report.accuracy_row(b, n, a))
        for seed, (b, n, a) in enumerate([(0.5, 0.6, 0.3), (0.7, 0.8, 0.5)], start=1)
    ]
    header, _, rows = _parse_markdown(report.methods_table(report.aggregate(runs)["shapes"]))
    assert header == ["method", "Base", "Novel", "HM", "All", "runs"]
    # all: mean 40.00, sample std of (30, 50) = 14.14.
    assert rows == [["`student_stage2`", "60.00 ± 14.14", "70.00 ± 14.14", rows[0][3],
                     "40.00 ± 14.14", "2"]]  # fmt: skip
