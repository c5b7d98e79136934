"""`mokd-eval report`: every results JSON of a directory gathered into the paper's tables and figures.

Tables (Markdown, LaTeX booktabs, CSV) follow the paper: Table 1 k-NN and linear (Independent vs MOKD per pair),
Table 4 semi-supervised, Table 5 CIFAR, Table 6 COCO, Table 7 loss terms and Table 8 lambdas (from the training
config stored in mokd checkpoints), Table 9 consistency, plus one row per model with everything measured.
Only results whose recorded protocol is the paper's (`protocol.paper`, see mokd_eval/protocols.py) enter those
cells; every other one is listed under "Off-protocol results" with the fields that differ, so a table compares
like with like. A cell nobody measured is "–", never filled in. Two results for the same cell that disagree are
listed under Conflicts and the newest one is shown, marked "*". Independent cells of a pair row fall back to
single-model checkpoints (DINO, MoCo, timm) of that architecture when no independent pair run exists; those are
marked "†". Files that cannot be read, or that are ours with a broken structure, are named with the reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mokd.core import atomic
from mokd.core.checkpoints import read_checkpoint
from mokd.core.errors import MokdError
from mokd.core.pipeline import training_summary
from mokd.core.results import build_results

MISSING = "–"
CONFLICT_MARK = "*"
FALLBACK_MARK = "†"
LOSS_ORDER = ("sm", "cm", "st", "ct")
PRETTY_ARCHS = {"r18": "R18", "r34": "R34", "r50": "R50", "r101": "R101", "r152": "R152", "vit_t": "ViT-T",
                "vit_s": "ViT-S", "vit_b": "ViT-B"}
COCO_COLUMNS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50"),
                ("segm", "AP75")]


def pretty_arch(name: str | None) -> str:
    return PRETTY_ARCHS.get(name or "", name or "?")


# --- reading results ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One results JSON."""

    path: Path
    payload: dict[str, Any]

    @property
    def command(self) -> str:
        return str(self.payload.get("command"))

    @property
    def created(self) -> str:
        return str(self.payload.get("created") or "")


def is_results(payload: Any) -> bool:
    return (isinstance(payload, dict) and "command" in payload and isinstance(payload.get("results"), list)
            and "schema_version" in payload)


def looks_like_ours(payload: Any) -> bool:
    """A results JSON of ours, whole or not: it names its schema version or a command and its results."""
    return isinstance(payload, dict) and ("schema_version" in payload or {"command", "results"} <= payload.keys())


def structure_problem(payload: dict[str, Any]) -> str | None:
    """Why a JSON of ours cannot be read as results (None when it can): the fields the report relies on."""
    if not is_results(payload):
        missing = [name for name in ("schema_version", "command", "results") if name not in payload]
        return f"missing {', '.join(missing)}" if missing else "'results' is not a list"
    for name in ("protocol", "dataset"):
        if not isinstance(payload.get(name) or {}, dict):
            return f"'{name}' is not an object"
    for index, entry in enumerate(payload["results"]):
        if not isinstance(entry, dict):
            return f"results[{index}] is not an object"
        if not isinstance(entry.get("metrics"), dict):
            return f"results[{index}] has no 'metrics' object"
        if not isinstance(entry.get("protocol") or {}, dict):
            return f"results[{index}].protocol is not an object"
    return None


@dataclass
class Skipped:
    """A JSON file the report did not use, and why; `broken` ones fail a `--strict` report."""

    path: Path
    reason: str
    broken: bool


def load_sources(directory: Path, exclude: Path | None = None) -> tuple[list[Source], list[Skipped]]:
    """Every mokd results JSON under `directory` (recursively), oldest first, and every JSON file skipped with
    the reason; refuses a directory without any results."""
    if not directory.is_dir():
        raise MokdError(f"results directory {directory} does not exist; give the folder the commands wrote to "
                        "(default: results/)")
    skip = exclude.resolve() if exclude is not None else None
    found, skipped = [], []
    for path in sorted(directory.rglob("*.json")):
        if skip is not None and skip in path.resolve().parents:
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as error:
            skipped.append(Skipped(path, f"cannot be read ({type(error).__name__})", broken=True))
            continue
        except ValueError as error:
            skipped.append(Skipped(path, f"not valid JSON, truncated? ({error})", broken=True))
            continue
        if not looks_like_ours(payload):
            skipped.append(Skipped(path, "not a mokd results file", broken=False))
        elif payload.get("command") in ("report", "suite"):
            continue  # summaries of other results, not results
        elif (problem := structure_problem(payload)) is not None:
            skipped.append(Skipped(path, f"a mokd results file with a broken structure: {problem}", broken=True))
        else:
            found.append(Source(path, payload))
    if not found:
        what = (f"{len(skipped)} JSON file(s), none written by mokd-eval as readable results (e.g. "
                f"{skipped[0].path.name}: {skipped[0].reason})" if skipped else "no JSON files")
        raise MokdError(f"{directory} holds {what}; run mokd-eval knn/linear/... first or point to their --out folder")
    return sorted(found, key=lambda source: (source.created, str(source.path))), skipped


@dataclass(frozen=True)
class ModelInfo:
    """How one evaluated model was trained, as far as its results entry (or its checkpoint) tells."""

    arch: str
    mode: str | None
    net: int | None
    pair: tuple[str, ...] | None
    losses: tuple[str, ...] | None
    lambdas: tuple[float | None, float | None]
    name: str

    @property
    def pair_label(self) -> tuple[str, str] | None:
        if not self.pair or len(self.pair) != 2:
            return None
        return pretty_arch(self.pair[0]), pretty_arch(self.pair[1])

    @property
    def method(self) -> str:
        return {"mokd": "MOKD", "independent": "Independent"}.get(self.mode or "", "unknown")


class TrainingLookup:
    """Training summaries: from the results entry when recorded, else from the checkpoint file (read once)."""

    def __init__(self) -> None:
        self.files: dict[str, Any] = {}

    def info(self, entry: dict[str, Any]) -> ModelInfo:
        checkpoint = entry.get("checkpoint") or {}
        training = checkpoint.get("training")
        if training is None and checkpoint.get("path"):
            training = self._from_file(checkpoint["path"], entry.get("key", ""))
        training = training or {}
        pair = training.get("pair")
        losses = training.get("losses")
        if losses is None and training.get("mode") == "independent" and pair:
            losses = ["sm"]
        name = f"{Path(checkpoint.get('path') or 'random').stem}:{entry.get('key')}"
        return ModelInfo(arch=entry.get("arch", "?"), mode=training.get("mode"), net=training.get("net"),
                         pair=tuple(pair) if pair else None, losses=tuple(losses) if losses else None,
                         lambdas=(training.get("lambda1"), training.get("lambda2")), name=name)

    def _from_file(self, path: str, key: str) -> dict[str, Any] | None:
        if path not in self.files:
            try:
                self.files[path] = read_checkpoint(path)
            except (MokdError, OSError):
                self.files[path] = None
        checkpoint = self.files[path]
        return training_summary(checkpoint, key) if checkpoint is not None else None


# --- cells and tables --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    value: float
    text: str
    source: str
    created: str


@dataclass
class Table:
    name: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


class Cells:
    """Values per (table, row, column) with their sources; fallbacks only fill otherwise empty cells."""

    def __init__(self) -> None:
        self.main: dict[tuple, list[Candidate]] = {}
        self.fallback: dict[tuple, list[Candidate]] = {}
        self.rows: dict[str, dict[tuple, None]] = {}

    def add(self, table: str, row: tuple, column: str, value: float, text: str, source: Source,
            fallback: bool = False) -> None:
        store = self.fallback if fallback else self.main
        candidate = Candidate(value, text, str(source.path), source.created)
        store.setdefault((table, row, column), []).append(candidate)
        if not fallback:
            self.rows.setdefault(table, {})[row] = None

    def text(self, table: str, row: tuple, column: str, conflicts: list[dict[str, Any]]) -> str:
        candidates = self.main.get((table, row, column))
        mark = ""
        if not candidates:
            candidates = self.fallback.get((table, row, column))
            mark = FALLBACK_MARK
        if not candidates:
            return MISSING
        newest = max(candidates, key=lambda c: c.created)
        if len({c.text for c in candidates}) > 1:
            values = [{"value": c.text, "source": c.source, "created": c.created}
                      for c in sorted(candidates, key=lambda c: (c.created, c.source))]
            known = next((c for c in conflicts if c["values"] == values), None)
            if known is None:
                conflicts.append({"tables": [table], "row": " ".join(map(str, row)), "column": column,
                                  "values": values, "shown": newest.text})
            elif table not in known["tables"]:
                known["tables"].append(table)
            mark += CONFLICT_MARK
        return newest.text + mark

    def row_keys(self, table: str) -> list[tuple]:
        return list(self.rows.get(table, {}))


def _pct(value: float) -> str:
    return f"{value:.1f}"


def _entry_protocol(source: Source, entry: dict[str, Any]) -> dict[str, Any]:
    return {**(source.payload.get("protocol") or {}), **(entry.get("protocol") or {})}


def _best_knn(entry: dict[str, Any]) -> float | None:
    knn = (entry.get("metrics") or {}).get("knn")
    if not knn:
        return None
    best = entry.get("best_k")
    if best is not None and str(best) in knn:
        return float(knn[str(best)]["top1"])
    return max(float(values["top1"]) for values in knn.values())


def _top1(entry: dict[str, Any], metric: str) -> float | None:
    values = (entry.get("metrics") or {}).get(metric)
    return float(values["top1"]) if isinstance(values, dict) and "top1" in values else None


def _percent_label(protocol: dict[str, Any]) -> str | None:
    value = protocol.get("percent")
    if value is None and protocol.get("fraction") is not None:
        value = 100 * float(protocol["fraction"])
    return f"{float(value):g}%" if value is not None else None


def _cifar_label(source: Source, protocol: dict[str, Any]) -> str | None:
    name = protocol.get("dataset") or str((source.payload.get("dataset") or {}).get("spec", "")).split(":")[0]
    return {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(str(name).lower())


PAIR_COLUMNS = ["Independent Net1", "Independent Net2", "MOKD Net1", "MOKD Net2"]


def data_label(source: Source) -> str:
    """Short name of the evaluation dataset: the folder name of a path spec, else the spec itself."""
    spec = str((source.payload.get("dataset") or {}).get("spec") or "?")
    kind, _, path = spec.partition(":")
    return Path(path).name if kind in ("imagefolder", "cifar10", "cifar100") and path else spec


def _pair_metric(cells: Cells, table: str, group: str, info: ModelInfo, value: float, source: Source,
                 singles: list[tuple[str, str, ModelInfo, float, Source]], with_data: bool = True) -> None:
    """A pair cell (mode x net) of Tables 1/4/5, or a single-model fallback kept for later. MOKD cells take only
    runs with all four loss terms (ablation runs belong to Table 7)."""
    full_mokd = info.mode == "mokd" and (info.losses is None or set(info.losses) == set(LOSS_ORDER))
    if info.pair_label and info.net in (1, 2) and (full_mokd or info.mode == "independent"):
        row = (*info.pair_label, data_label(source)) if with_data else info.pair_label
        cells.add(table, row, f"{group} {info.method} Net{info.net}", value, _pct(value), source)
    elif info.pair is None and info.mode == "independent":
        singles.append((table, group, info, value, source))


@dataclass(frozen=True)
class OffProtocol:
    """A result kept out of the paper's tables: what it is and how its protocol differs from the paper's."""

    model: str
    arch: str
    training: str
    data: str
    result: str
    value: str
    differs: str

    def row(self) -> list[str]:
        return [self.model, self.arch, self.training, self.data, self.result, self.value, self.differs]


OFF_PROTOCOL_HEADERS = ["Model", "Arch", "Training", "Data", "Result", "Value", "Differs from the paper in"]
PLACED_COMMANDS = ("knn", "linear", "semisup", "cifar", "coco")  # the commands behind Tables 1 and 4-6


def differs_text(protocol: dict[str, Any]) -> str | None:
    """None when the recorded protocol is the paper's, else the fields that differ (or that none was recorded)."""
    if protocol.get("paper") is True:
        return None
    if "paper" not in protocol:
        return "protocol not recorded (written before protocols were)"
    return ", ".join(protocol.get("differs") or ["unknown"])


def result_label(command: str, source: Source, protocol: dict[str, Any]) -> str:
    """What an off-protocol result measures, named so it cannot pass for a paper column."""
    mode = protocol.get("mode")
    if command == "knn":
        return "k-NN"
    if command == "linear":
        return "Linear, cached features" if mode == "cached" else "Linear"
    if command == "semisup":
        label = f"Semi-sup {_percent_label(protocol) or '?'}"
        return f"{label}, frozen linear probe" if mode == "linear" else label
    if command == "cifar":
        return _cifar_label(source, protocol) or "CIFAR"
    return "COCO APb / APm"


def result_value(command: str, entry: dict[str, Any]) -> str | None:
    """The headline number of one result entry as the tables print it."""
    if command == "knn":
        value = _best_knn(entry)
    elif command == "coco":
        coco = (entry.get("metrics") or {}).get("coco") or {}
        box, mask = (coco.get("bbox") or {}).get("AP"), (coco.get("segm") or {}).get("AP")
        return None if box is None and mask is None else " / ".join(
            MISSING if v is None else _pct(float(v)) for v in (box, mask))
    else:
        value = _top1(entry, command)
    return None if value is None else _pct(value)


def collect(sources: Iterable[Source], lookup: TrainingLookup) -> tuple[Cells, list[Source], list[OffProtocol]]:
    """Every number of every results JSON placed in its table cell, or listed as off-protocol."""
    cells, consistency, singles, off = Cells(), [], [], []
    for source in sources:
        command = source.command
        if command == "consistency":
            consistency.append(source)
            continue
        for entry in source.payload["results"]:
            info = lookup.info(entry)
            protocol = _entry_protocol(source, entry)
            if command in PLACED_COMMANDS and (differs := differs_text(protocol)) is not None:
                value = result_value(command, entry)
                if value is not None:
                    off.append(OffProtocol(info.name, pretty_arch(info.arch), info.method, data_label(source),
                                           result_label(command, source, protocol), value, differs))
                continue
            row_all = (info.name, pretty_arch(info.arch), info.method, data_label(source))
            knn, linear = _best_knn(entry) if command == "knn" else None, _top1(entry, "linear")
            if command == "knn" and knn is not None:
                _pair_metric(cells, "table1", "k-NN", info, knn, source, singles)
                cells.add("all", row_all, "k-NN", knn, _pct(knn), source)
            if command == "linear" and linear is not None:
                _pair_metric(cells, "table1", "Linear", info, linear, source, singles)
                cells.add("all", row_all, "Linear", linear, _pct(linear), source)
            semisup, percent = _top1(entry, "semisup"), _percent_label(protocol)
            if command == "semisup" and semisup is not None and percent:
                _pair_metric(cells, "table4", percent, info, semisup, source, singles)
                cells.add("all", row_all, f"Semi-sup {percent}", semisup, _pct(semisup), source)
            cifar, dataset = _top1(entry, "cifar"), _cifar_label(source, protocol)
            if command == "cifar" and cifar is not None and dataset:
                _pair_metric(cells, "table5", dataset, info, cifar, source, singles, with_data=False)
                cells.add("all", row_all, dataset, cifar, _pct(cifar), source)
            coco = (entry.get("metrics") or {}).get("coco")
            if command == "coco" and coco:
                partner = [pretty_arch(a) for a in (info.pair or ()) if a != info.arch][:1]
                row = (info.method, partner[0] if partner else "-", pretty_arch(info.arch))
                for task, metric in COCO_COLUMNS:
                    value = (coco.get(task) or {}).get(metric)
                    if value is not None:
                        cells.add("table6", row, f"{task} {metric}", float(value), _pct(float(value)), source)
            if info.pair_label and info.losses and info.net in (1, 2) and command in ("knn", "linear"):
                value = knn if command == "knn" else linear
                if value is not None:
                    _ablation_cells(cells, info, command, value, source)
    for table, group, info, value, source in singles:  # fill Independent cells nobody else filled
        for row in cells.row_keys(table):
            same_data = table == "table5" or row[2] == data_label(source)
            for net in (1, 2):
                if row[net - 1] == pretty_arch(info.arch) and same_data:
                    cells.add(table, row, f"{group} Independent Net{net}", value, _pct(value), source, fallback=True)
    return cells, consistency, off


def _ablation_cells(cells: Cells, info: ModelInfo, command: str, value: float, source: Source) -> None:
    label = "k-NN" if command == "knn" else "Linear"
    losses = tuple(term for term in LOSS_ORDER if term in info.losses)
    lambdas = tuple("-" if v is None else f"{v:g}" for v in info.lambdas)
    data = data_label(source)
    cells.add("table7", (*info.pair_label, data, *losses_marks(losses), *lambdas), f"{label} Net{info.net}", value,
              _pct(value), source)
    if set(losses) == set(LOSS_ORDER):
        cells.add("table8", (*info.pair_label, data, *lambdas), f"{label} Net{info.net}", value, _pct(value), source)


def losses_marks(losses: tuple[str, ...]) -> tuple[str, ...]:
    return tuple("✓" if term in losses else "" for term in LOSS_ORDER)


def _consistency_rows(sources: list[Source], lookup: TrainingLookup, cells: Cells) -> None:
    for source in sources:
        results = source.payload["results"]
        infos = [lookup.info(entry) for entry in results]
        stats = source.payload.get("consistency") or {}
        comparisons = [("pair", infos[0], infos[1])]
        if "control" in stats and len(infos) > 2:
            comparisons.append(("control", infos[2], infos[1]))
        for kind, info_a, info_b in comparisons:
            values = stats[kind]
            method = info_a.method if kind == "pair" else f"{info_a.method} (control: {info_a.name} replaces A)"
            row = (method, f"{pretty_arch(info_a.arch)} / {pretty_arch(info_b.arch)}", data_label(source),
                   f"{info_a.name} vs {info_b.name}")
            for column, value, text in (
                    ("k-NN A", 100 * values["accuracy_a"], _pct(100 * values["accuracy_a"])),
                    ("k-NN B", 100 * values["accuracy_b"], _pct(100 * values["accuracy_b"])),
                    ("Consistency", values["agreement"], f"{values['agreement']:.3f}"),
                    ("If independent", values["independent_errors_agreement"],
                     f"{values['independent_errors_agreement']:.3f}"),
                    ("Kappa", values["cohen_kappa"], f"{values['cohen_kappa']:.3f}")):
                cells.add("table9", row, column, value, text, source)


TABLE_LAYOUT: list[tuple[str, str, list[str], list[str]]] = [
    # name, title, row headers, value columns (None = computed from the cells)
    ("table1", "Table 1: k-NN and linear probing top-1 (%)", ["Net1", "Net2", "Data"],
     [f"{g} {c}" for g in ("k-NN", "Linear") for c in PAIR_COLUMNS]),
    ("table4", "Table 4: semi-supervised top-1 (%)", ["Net1", "Net2", "Data"],
     [f"{g} {c}" for g in ("1%", "10%") for c in PAIR_COLUMNS]),
    ("table5", "Table 5: CIFAR transfer top-1 (%)", ["Net1", "Net2"],
     [f"{g} {c}" for g in ("CIFAR-10", "CIFAR-100") for c in PAIR_COLUMNS]),
    ("table6", "Table 6: COCO detection (bbox) and instance segmentation (segm), C4 Mask R-CNN",
     ["Method", "Net1", "Net2"], [f"{task} {metric}" for task, metric in COCO_COLUMNS]),
    ("table7", "Table 7: loss terms (from the checkpoints' training config)",
     ["Net1", "Net2", "Data", "Lsm", "Lcm", "Lst", "Lct", "lambda1", "lambda2"],
     ["Linear Net1", "Linear Net2", "k-NN Net1", "k-NN Net2"]),
    ("table8", "Table 8: cross-distillation weights lambda1, lambda2 (all four loss terms)",
     ["Net1", "Net2", "Data", "lambda1", "lambda2"], ["Linear Net1", "Linear Net2", "k-NN Net1", "k-NN Net2"]),
    ("table9", "Table 9: prediction consistency (k-NN predictions)", ["Method", "Backbones", "Data", "Models"],
     ["k-NN A", "k-NN B", "Consistency", "If independent", "Kappa"]),
    ("all", "Every evaluated model", ["Model", "Arch", "Training", "Data"],
     ["k-NN", "Linear", "Semi-sup 1%", "Semi-sup 10%", "CIFAR-10", "CIFAR-100"]),
]


def off_protocol_table(off: list[OffProtocol]) -> Table:
    """Results that are not the paper's protocol, one row each with the fields that differ."""
    rows = [item.row() for item in sorted(set(off), key=lambda item: item.row())]
    return Table("offprotocol", "Off-protocol results", OFF_PROTOCOL_HEADERS, rows,
                 ["not in the paper's tables above: their protocol differs from the paper's in the fields named"
                  ] if rows else [])


def build_tables(cells: Cells, conflicts: list[dict[str, Any]]) -> list[Table]:
    tables = []
    for name, title, row_headers, columns in TABLE_LAYOUT:
        rows = [[*map(str, row), *(cells.text(name, row, column, conflicts) for column in columns)]
                for row in cells.row_keys(name)]
        notes = []
        flat = " ".join(cell for row in rows for cell in row)
        if FALLBACK_MARK in flat:
            notes.append(f"{FALLBACK_MARK} from a single-model checkpoint of that architecture (no independent pair run)")
        if CONFLICT_MARK in flat:
            notes.append(f"{CONFLICT_MARK} conflicting results for this cell: the newest is shown (see Conflicts)")
        tables.append(Table(name, title, [*row_headers, *columns], rows, notes))
    return tables


# --- rendering ---------------------------------------------------------------------------------------------------


def to_markdown(table: Table) -> str:
    lines = [f"| {' | '.join(table.headers)} |", "|" + "|".join("---" for _ in table.headers) + "|"]
    lines += [f"| {' | '.join(row)} |" for row in table.rows] or [f"| {' | '.join([MISSING] * len(table.headers))} |"]
    return "\n".join(lines + [f"\n{note}" for note in table.notes]) + "\n"


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                          ("–", "--"), ("✓", r"\checkmark"), ("†", r"$^\dagger$"), ("*", r"$^*$")):
        text = text.replace(char, escaped)
    return text


def to_latex(table: Table) -> str:
    spec = "l" + "c" * (len(table.headers) - 1)
    lines = [f"% {table.title}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(_latex_escape(h) for h in table.headers) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_escape(cell) for cell in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.headers)
    writer.writerows(table.rows)
    return buffer.getvalue()


def _figures(sources: list[Source], out_dir: Path) -> list[tuple[str, str]]:
    """(caption, relative path) of every PNG a results JSON points to."""
    figures = []
    for source in sources:
        payload = source.payload
        candidates: list[tuple[str, str]] = []
        if source.command == "tsne":
            candidates.append((f"t-SNE: {', '.join(payload['tsne']['models'])}", payload["tsne"]["figures"]["png"]))
        elif source.command == "mad":
            labels = ", ".join(e["metrics"]["mad"]["label"] for e in payload["results"])
            candidates.append((f"Mean attention distance: {labels}", payload["figures"]["png"]))
        elif source.command == "attention":
            for key, paths in payload["figures"].items():
                candidates.append((f"Attention maps: {key}", paths["png"]))
        for caption, path in candidates:
            figures.append((caption, os.path.relpath(path, out_dir) if Path(path).exists() else f"{path} (missing)"))
    return figures


def render_report(tables: list[Table], conflicts: list[dict[str, Any]], figures: list[tuple[str, str]],
                  n_sources: int, skipped: Sequence[Skipped] = ()) -> str:
    parts = [f"# mokd report\n\nGathered from {n_sources} results JSON file(s). {MISSING} = not measured.\n"]
    for table in tables:
        parts.append(f"## {table.title}\n\n{to_markdown(table)}")
    if conflicts:
        parts.append("## Conflicts\n")
        for conflict in conflicts:
            values = "; ".join(f"{v['value']} ({v['source']}, {v['created']})" for v in conflict["values"])
            parts.append(f"- {conflict['row']} / {conflict['column']} (in {', '.join(conflict['tables'])}): {values}; "
                         f"shown: {conflict['shown']} (newest)")
        parts.append("")
    if skipped:
        parts.append("## Skipped files\n")
        parts += [f"- {item.path}: {item.reason}" for item in skipped]
        parts.append("")
    if figures:
        parts.append("## Figures\n")
        parts += [f"![{caption}]({path})\n" for caption, path in figures]
    return "\n".join(parts)


def run_report(results_dir: Path, out_dir: Path, *, strict: bool = False,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Read every results JSON under `results_dir`; write report.md and tables/*.{md,tex,csv} to `out_dir`.
    Every skipped file is named with the reason; with `strict`, a broken one (unreadable, truncated, ours with a
    broken structure) fails the report before anything is written."""
    sources, skipped = load_sources(results_dir, exclude=out_dir)
    for item in skipped:
        echo(f"skipped {item.path}: {item.reason}")
    broken = [item for item in skipped if item.broken]
    if strict and broken:
        raise MokdError(f"--strict: {len(broken)} broken results file(s) under {results_dir}, e.g. {broken[0].path} "
                        f"({broken[0].reason}); fix or remove them")
    lookup = TrainingLookup()
    cells, consistency_sources, off = collect(sources, lookup)
    _consistency_rows(consistency_sources, lookup, cells)
    conflicts: list[dict[str, Any]] = []
    tables = [*build_tables(cells, conflicts), off_protocol_table(off)]
    figures = _figures(sources, out_dir)
    files = {}
    for table in tables:
        for ext, render in (("md", to_markdown), ("tex", to_latex), ("csv", to_csv)):
            files[f"{table.name}.{ext}"] = str(atomic.write_text(out_dir / "tables" / f"{table.name}.{ext}",
                                                                 render(table)))
    report_path = atomic.write_text(out_dir / "report.md",
                                    render_report(tables, conflicts, figures, len(sources), skipped))
    echo(f"read {len(sources)} results JSON file(s) from {results_dir}; {len(conflicts)} conflict(s); "
         f"{len(off)} off-protocol result(s); {len(skipped)} file(s) skipped ({len(broken)} broken)")
    payload = build_results(command="report", protocol={"name": "report"}, dataset={}, results=[], timings={},
                            seed=None, config={"results_dir": str(results_dir), "out_dir": str(out_dir)})
    payload["report"] = {"markdown": str(report_path), "files": files, "sources": [str(s.path) for s in sources],
                         "skipped": [{"path": str(item.path), "reason": item.reason, "broken": item.broken}
                                     for item in skipped],
                         "conflicts": conflicts,
                         "tables": {t.name: {"headers": t.headers, "rows": t.rows} for t in tables}}
    return payload


def report_summary(payload: dict[str, Any]) -> str:
    lines = []
    for name, table in payload["report"]["tables"].items():
        lines.append(f"{name}: {len(table['rows'])} row(s)")
    return "\n".join(lines + [f"report: {payload['report']['markdown']}"])
