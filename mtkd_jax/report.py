"""Results of MTKD runs as text, markdown and pictures: one run's table, a chart, a seed sweep.

Everything here is a pure function of the plain dicts that `results.json` holds:

    {"dataset": "oxford_pets", "shots": 16, "seed": 1, "config": {...},
     "methods": {"teacher": {"base": 0.97, "novel": 0.98, "hm": 0.975, "all": 0.96}, ...}}

Accuracies are fractions in [0, 1]; tables print them in percent with two decimals. A method may
lack "base", "novel" and "hm" (a run without the base-to-novel protocol); such cells print "-".

Statistics over seeds (`aggregate`) are the mean and the *sample* standard deviation (n - 1 in
the denominator, as the few-shot CLIP papers report over their three seeds; 0 for a single run).
The HM of one dataset is the mean of each run's HM; the "Average" row of `markdown_table`
averages the datasets' means and, as CoOp-family tables do, takes the HM of the averaged base
and novel accuracies.

This module imports neither Keras nor TensorFlow; matplotlib is imported by `plot_results` only.
"""

import math
import os
from collections.abc import Iterable, Mapping, Sequence

from mtkd_jax import atomic

METRICS = ("base", "novel", "hm", "all")
METRIC_TITLES = {"base": "Base", "novel": "Novel", "hm": "HM", "all": "All"}
# Methods in the order of the method: teachers, then students stage by stage. Names not listed
# keep their first-seen order, teachers (names starting with "teacher") before students.
METHOD_ORDER = (
    "teacher_zero_shot",
    "teacher_stage0",
    "teacher",
    "student_supervised",
    "student_stage1_instance_only",
    "student_stage1",
    "student_stage2",
)
MISSING = "-"


def harmonic_mean(base: float, novel: float) -> float:
    """The harmonic mean 2·b·n / (b + n) of base and novel accuracy; 0 when either is 0.

    Raises:
        ValueError: an accuracy is negative or not finite.
    """
    for name, value in (("base", base), ("novel", novel)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"Accuracies must be finite and non-negative. Received: {name}={value!r}"
            )
    if base == 0 or novel == 0:
        return 0.0
    return 2.0 * base * novel / (base + novel)


def accuracy(logits, labels, class_ids) -> float:
    """Accuracy among `class_ids` only, of the images whose label is in `class_ids`.

    Args:
      logits: `[N, C]` logits over all classes.
      labels: `[N]` original label ids.
      class_ids: the label ids competing (e.g. the novel classes); NaN when no image has one.
    """
    import numpy as np

    logits, labels, class_ids = np.asarray(logits), np.asarray(labels), np.asarray(class_ids)
    keep = np.isin(labels, class_ids)
    if not keep.any():
        return float("nan")
    restricted = logits[keep][:, class_ids]
    return float(np.mean(class_ids[np.argmax(restricted, axis=1)] == labels[keep]))


def base_novel_accuracies(logits, labels, dataset, base_to_novel: bool) -> dict[str, float]:
    """`{"base", "novel", "hm", "all"}` accuracies in [0, 1] from test logits `[N, C]` and
    labels `[N]` of `dataset` (a `FewShotDataset`); "base", "novel", "hm" with `base_to_novel`."""
    result = {"all": accuracy(logits, labels, dataset.class_ids("all"))}
    if base_to_novel:
        base = accuracy(logits, labels, dataset.class_ids("base"))
        novel = accuracy(logits, labels, dataset.class_ids("novel"))
        result.update(base=base, novel=novel, hm=harmonic_mean(base, novel))
    return result


def accuracy_row(
    base: float | None = None, novel: float | None = None, all: float | None = None
) -> dict[str, float]:
    """One method's entry of `results.json`: the accuracies given, plus "hm" when both base and
    novel are given. Accuracies are fractions in [0, 1]; a None one is left out.

    Example: `accuracy_row(0.8, 0.6, 0.7)` is
    `{"base": 0.8, "novel": 0.6, "hm": 0.6857..., "all": 0.7}`.
    """
    row: dict[str, float] = {}
    for name, value in (("base", base), ("novel", novel), ("all", all)):
        if value is None:
            continue
        value = float(value)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(
                f"Accuracies are fractions in [0, 1]. Received: {name}={value!r}. "
                "Divide percentages by 100."
            )
        row[name] = value
    if "base" in row and "novel" in row:
        row["hm"] = harmonic_mean(row["base"], row["novel"])
    return {name: row[name] for name in METRICS if name in row}


def ordered_methods(names: Iterable[str]) -> list[str]:
    """Method names in stage order: the known ones as `METHOD_ORDER`, then other teachers, then
    other students, each group in first-seen order; duplicates dropped."""
    unique = list(dict.fromkeys(names))
    rank = {name: i for i, name in enumerate(METHOD_ORDER)}

    def key(item: tuple[int, str]) -> tuple[int, int]:
        position, name = item
        if name in rank:
            return (0, rank[name])
        return (1 if name.startswith("teacher") else 2, position)

    return [name for _, name in sorted(enumerate(unique), key=key)]


def _methods_of(results: Mapping) -> Mapping[str, Mapping[str, float]]:
    if not isinstance(results, Mapping):
        raise ValueError(f"A results dict is a mapping (as in results.json). Received: {results!r}")
    methods = results.get("methods")
    if not isinstance(methods, Mapping):
        raise ValueError(
            'A results dict needs a "methods" mapping (method -> accuracies), as results.json '
            f"holds. Received keys: {sorted(results)}"
        )
    return methods


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100.0 * value:.2f}"


def run_title(results: Mapping) -> str:
    """'oxford_pets, 16 shots, seed 1' from whichever of the three keys the dict has."""
    parts = []
    if "dataset" in results:
        parts.append(str(results["dataset"]))
    if "shots" in results:
        parts.append(f"{results['shots']} shots")
    if "seed" in results:
        parts.append(f"seed {results['seed']}")
    return ", ".join(parts)


def format_results_table(results: Mapping) -> str:
    """One run's accuracies as a fixed-width text table, in percent with two decimals:

        oxford_pets, 16 shots, seed 1
        method          |   base |  novel |     HM |    all
        ----------------+--------+--------+--------+-------
        teacher         |  95.12 |  97.80 |  96.44 |  93.50

    Methods are in stage order (teachers first); missing accuracies print "-".
    """
    methods = _methods_of(results)
    names = ordered_methods(methods)
    width = max([len("method"), *(len(name) for name in names)])
    titles = {"base": "base", "novel": "novel", "hm": "HM", "all": "all"}
    header = " | ".join([f"{'method':<{width}}", *(f"{titles[m]:>6}" for m in METRICS)])
    rule = "-+-".join(["-" * width, *("-" * 6 for _ in METRICS)])
    lines = [line for line in (run_title(results), header, rule) if line]
    for name in names:
        row = methods[name]
        cells = [f"{_percent(row.get(metric)):>6}" for metric in METRICS]
        lines.append(" | ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)


def plot_results(results: Mapping, path: str | os.PathLike):
    """Writes a PNG bar chart of one run: per method (in stage order) a group of bars for base,
    novel, HM and all accuracy (in percent), titled with dataset, shots and seed. Missing
    accuracies get no bar. The file is written atomically (a temporary file, then a rename).

    Returns:
        The matplotlib `Figure` that was saved (one bar patch per accuracy present).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = _methods_of(results)
    names = ordered_methods(methods)
    figure = Figure(figsize=(max(6.0, 1.4 * len(names) + 2.0), 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # The Agg canvas: no display, no global pyplot state.
    axes = figure.add_subplot()
    bar_width = 0.8 / len(METRICS)
    for offset, metric in enumerate(METRICS):
        xs = [i for i, name in enumerate(names) if methods[name].get(metric) is not None]
        heights = [100.0 * methods[names[i]][metric] for i in xs]
        if xs:
            positions = [x + (offset - (len(METRICS) - 1) / 2) * bar_width for x in xs]
            axes.bar(positions, heights, bar_width, label=METRIC_TITLES[metric])
    axes.set_xticks(range(len(names)), names, rotation=20, ha="right")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(run_title(results) or "MTKD results")
    if names:
        axes.legend(loc="lower right", fontsize="small")

    with atomic.replacing(path) as temporary, open(temporary, "wb") as stream:
        figure.savefig(stream, format="png", dpi=100)
    return figure


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = math.fsum(values) / n
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(variance), "n": n}


def aggregate(results_list: Sequence[Mapping]) -> dict[str, dict[str, dict[str, dict]]]:
    """Mean and sample std over seeds, per dataset and method, of base/novel/hm/all accuracy.

    Args:
        results_list: `results.json` dicts, typically one per (dataset, seed).

    Returns:
        `{dataset: {method: {metric: {"mean": m, "std": s, "n": runs}}}}` with fractions in
        [0, 1]; a metric is listed when at least one run has it, over the runs that have it.
        Datasets and methods keep their first-seen order.

    Raises:
        ValueError: a dict lacks "dataset" or "methods", or one dataset's runs mix shot counts
            or repeat a seed (their mean would not be a mean over seeds).
    """
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    shots: dict[str, object] = {}
    seeds: dict[str, set] = {}
    for results in results_list:
        methods = _methods_of(results)
        if "dataset" not in results:
            raise ValueError(
                'Every results dict needs a "dataset" key, as results.json holds. '
                f"Received keys: {sorted(results)}"
            )
        dataset = str(results["dataset"])
        if shots.setdefault(dataset, results.get("shots")) != results.get("shots"):
            raise ValueError(
                f"The runs of {dataset!r} mix shot counts ({shots[dataset]} and "
                f"{results.get('shots')}); aggregate each shot count separately."
            )
        seed = results.get("seed")
        if seed is not None:
            if seed in seeds.setdefault(dataset, set()):
                raise ValueError(
                    f"Two runs of {dataset!r} have seed {seed}: a mean over seeds needs each seed "
                    "once. Aggregate the results of one sweep (one workdir root) at a time."
                )
            seeds[dataset].add(seed)
        per_method = values.setdefault(dataset, {})
        for method, row in methods.items():
            per_metric = per_method.setdefault(method, {})
            for metric in METRICS:
                if row.get(metric) is not None:
                    per_metric.setdefault(metric, []).append(float(row[metric]))
    return {
        dataset: {
            method: {metric: _mean_std(v) for metric, v in per_metric.items() if v}
            for method, per_metric in per_method.items()
        }
        for dataset, per_method in values.items()
    }


def _cell(stats: Mapping | None) -> str:
    if not stats:
        return MISSING
    return f"{100.0 * stats['mean']:.2f} ± {100.0 * stats['std']:.2f}"


def markdown_table(
    aggregated: Mapping[str, Mapping[str, Mapping[str, Mapping]]],
    methods: Sequence[str] | None = None,
) -> str:
    """The shape of the paper's tables: one row per dataset plus an "Average" row, and for each
    method the columns base / novel / HM as "mean ± std" in percent.

    Args:
        aggregated: the output of `aggregate`.
        methods: the methods to show, in this order; default: every method found, in stage
            order.

    When no run has base/novel accuracies (no base-to-novel protocol), each method gets one
    "All" column instead. The "Average" row holds the mean over datasets of each dataset's
    mean (no ±), and its HM is the harmonic mean of the averaged base and novel accuracies.
    Missing values print "-".
    """
    if methods is None:
        methods = ordered_methods(name for per_method in aggregated.values() for name in per_method)
    else:
        methods = list(methods)
        found = {name for per_method in aggregated.values() for name in per_method}
        unknown = [name for name in methods if name not in found]
        if unknown:
            raise ValueError(
                f"No results for methods {unknown}. Methods found: {ordered_methods(found)}."
            )
    has_base_novel = any(
        metric in aggregated[dataset].get(method, {})
        for dataset in aggregated
        for method in methods
        for metric in ("base", "novel")
    )
    metrics = ("base", "novel", "hm") if has_base_novel else ("all",)

    header = ["Dataset"] + [f"{method} {METRIC_TITLES[m]}" for method in methods for m in metrics]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|",
    ]
    for dataset, per_method in aggregated.items():
        cells = [_cell(per_method.get(method, {}).get(m)) for method in methods for m in metrics]
        lines.append("| " + " | ".join([dataset, *cells]) + " |")
    if aggregated:
        average = ["Average"]
        for method in methods:
            means = {}
            for metric in metrics:
                found = [
                    per_method[method][metric]["mean"]
                    for per_method in aggregated.values()
                    if metric in per_method.get(method, {})
                ]
                means[metric] = math.fsum(found) / len(found) if found else None
            if has_base_novel and means["base"] is not None and means["novel"] is not None:
                means["hm"] = harmonic_mean(means["base"], means["novel"])
            average += [_percent(means[m]) for m in metrics]
        lines.append("| " + " | ".join(average) + " |")
    return "\n".join(lines)


def methods_table(per_method: Mapping[str, Mapping[str, Mapping]]) -> str:
    """One dataset's methods as rows, base / novel / HM / all as "mean ± std" columns (percent).

    Args:
        per_method: `aggregate(...)[dataset]`: `{method: {metric: {"mean", "std", "n"}}}`.
    """
    lines = [
        "| method | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " | runs |",
        "| --- | " + " | ".join(":---:" for _ in METRICS) + " | ---: |",
    ]
    for method in ordered_methods(per_method):
        stats = per_method[method]
        runs = max((s["n"] for s in stats.values()), default=0)
        cells = [_cell(stats.get(metric)) for metric in METRICS]
        lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {runs} |")
    return "\n".join(lines)
