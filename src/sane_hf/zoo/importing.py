"""Import model zoos from other layouts into the raw zoo directory format of sane-hf.

Published zoos come in two shapes, and both end up as one raw zoo directory
(``zoo.json``, ``metadata.jsonl``, ``checkpoints/*.safetensors``) that the dataset builder
(`sane_hf.zoo.dataset`) reads:

- the Model Zoos / Ray Tune trial layout: one folder per model with ``params.json`` (the trial
  config), ``result.json`` (JSON lines, one per epoch) and ``checkpoint_<epoch>/checkpoints``
  (a pickled torch state_dict, the only place where sane-hf calls ``torch.load``, with
  ``weights_only=True``);
- a plain folder of ``*.safetensors`` checkpoints with a ``metadata.jsonl``: already the raw
  format, so importing validates it and copies the good checkpoints to canonical file names.

Real zoos contain broken members: truncated files, diverged runs with NaN weights, a model of
another architecture, epochs without metrics. Each problem skips the smallest unit it concerns
(one checkpoint, or a whole model when its config is unreadable) and is recorded with its reason
in an `ImportReport`; ``strict=True`` raises `ZooImportError` with the same message instead.
Work is saved model by model (checkpoints and a per-model progress file are written atomically),
so an interrupted import continues where it stopped when run again.

Source metadata is untrusted: a model id that is not a safe file name, or a ``file`` that leaves
the source folder (also in the output's own progress files and ``metadata.jsonl`` when resuming),
refuses the whole import with `ZooImportError` naming the id and file, before anything is read
from or written outside the folders. Weights must be floating point where the architecture's
are and finite; each problem names the file, the model and the parameter. The output folder is
locked for the import (`sane_hf.zoo.formats.zoo_writer_lock`): a second import or training into
it is refused with `ZooBusyError`. The readers of the foreign formats are in
`sane_hf.zoo.import_readers`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sane_hf.zoo.architectures import build_model
from sane_hf.zoo.formats import (
    RAW_METADATA_FILE,
    ZOO_FILE,
    atomic_write_text,
    check_checkpoint_tensors,
    check_model_id,
    load_zoo_info,
    load_zoo_metadata,
    resolve_in_zoo,
    write_checkpoint,
    write_zoo_info,
    write_zoo_metadata,
    zoo_writer_lock,
)
from sane_hf.zoo.import_readers import (
    HYPERPARAMETER_ALIASES,
    CheckpointProblem,
    hyperparameters_from_config,
    load_safetensors_checkpoint,
    load_torch_checkpoint,
    properties_from_metrics,
    read_result_lines,
    trial_checkpoints,
)

REPORT_FILE = "import_report.json"
PROGRESS_DIR = ".import_progress"


class ZooImportError(ValueError):
    """A problem with a zoo member, raised by ``import_zoo(..., strict=True)``."""


@dataclass
class SkippedItem:
    """One file or folder that was not imported, and why."""

    path: str
    reason: str
    model_id: str | None = None
    epoch: int | None = None

    @property
    def message(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class ImportReport:
    """What an import produced: models and epochs written, and everything skipped with reasons."""

    source: str
    output: str
    source_layout: str
    models: dict[str, list[int]] = field(default_factory=dict)
    resumed_models: list[str] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def num_checkpoints(self) -> int:
        return sum(len(epochs) for epochs in self.models.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"num_checkpoints": self.num_checkpoints}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImportReport:
        data = {key: value for key, value in data.items() if key != "num_checkpoints"}
        data["skipped"] = [SkippedItem(**item) for item in data.get("skipped", [])]
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """A few lines for the terminal: counts, then every skipped item with its reason."""
        lines = [
            f"imported {len(self.models)} models, {self.num_checkpoints} checkpoints "
            f"from {self.source} ({self.source_layout} layout) into {self.output}",
        ]
        if self.resumed_models:
            lines.append(
                f"  {len(self.resumed_models)} models were already imported by an earlier run"
            )
        lines += [f"  note: {note}" for note in self.notes]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} items:")
            lines += [f"  - {item.message}" for item in self.skipped]
        return "\n".join(lines)


def architecture_signature(architecture: str, architecture_kwargs: dict) -> dict[str, tuple]:
    """``{key: shape}`` of the state_dict of ``build_model(architecture, **architecture_kwargs)``."""
    model = build_model(architecture, **architecture_kwargs)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def floating_point_keys(architecture: str, architecture_kwargs: dict) -> list[str]:
    """Keys the architecture holds as floating point: a checkpoint must not hold integers there."""
    model = build_model(architecture, **architecture_kwargs)
    return [key for key, value in model.state_dict().items() if value.is_floating_point()]


def match_architecture(
    state_dict: dict[str, torch.Tensor], expected: dict[str, tuple], description: str
) -> dict[str, torch.Tensor]:
    """Return ``state_dict`` with our key names, or raise `CheckpointProblem` if it does not fit.

    Keys that differ from ours but come with the same shapes in the same order are renamed by
    position: the Model Zoos CNNs hold their layers in a ``module_list`` whose indices shift with
    optional dropout layers, while the parameters are the same.
    """
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    if shapes == expected:
        return state_dict
    if list(shapes.values()) == list(expected.values()):
        return dict(zip(expected, state_dict.values(), strict=True))
    missing = [key for key in expected if key not in shapes]
    unexpected = [key for key in shapes if key not in expected]
    if missing or unexpected:
        raise CheckpointProblem(
            f"architecture differs from {description}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    key = next(key for key in expected if shapes[key] != expected[key])
    raise CheckpointProblem(
        f"architecture differs from {description}: {key!r} has shape {list(shapes[key])}, "
        f"expected {list(expected[key])}"
    )


@dataclass
class _ImportState:
    """Work done so far, keyed by model: records written and items skipped."""

    records: dict[str, list[dict]] = field(default_factory=dict)
    skipped: dict[str, list[SkippedItem]] = field(default_factory=dict)


class _ZooWriter:
    """Validates and writes imported checkpoints into a raw zoo directory, one model at a time.

    A model is done once its progress file exists (written atomically after its checkpoints);
    ``finish`` merges the progress into ``metadata.jsonl``, ``zoo.json`` and the report.
    """

    def __init__(self, output: Path, report: ImportReport, zoo_info: dict, strict: bool):
        self.output = output
        self.report = report
        self.strict = strict
        self.expected = architecture_signature(
            zoo_info["architecture"], zoo_info["architecture_kwargs"]
        )
        self.description = f"{zoo_info['architecture']}({zoo_info['architecture_kwargs']})"
        self.float_keys = floating_point_keys(
            zoo_info["architecture"], zoo_info["architecture_kwargs"]
        )
        self.progress_dir = output / PROGRESS_DIR
        self.state = self._load_state()
        self.report.resumed_models = sorted(self.state.records)

    def _load_state(self) -> _ImportState:
        state = _ImportState()
        if (self.output / RAW_METADATA_FILE).is_file():
            records = load_zoo_metadata(self.output)
            _check_record_paths(self.output, records, str(self.output / RAW_METADATA_FILE))
            for record in records:
                state.records.setdefault(record["model_id"], []).append(record)
            if (self.output / REPORT_FILE).is_file():
                previous = ImportReport.from_dict(
                    json.loads((self.output / REPORT_FILE).read_text())
                )
                for item in previous.skipped:
                    if item.model_id in state.records:
                        state.skipped.setdefault(item.model_id, []).append(item)
        for path in sorted(self.progress_dir.glob("*.json")):
            progress = json.loads(path.read_text())
            _check_record_paths(self.output, progress["records"], str(path))
            state.records[progress["model_id"]] = progress["records"]
            state.skipped[progress["model_id"]] = [SkippedItem(**s) for s in progress["skipped"]]
        return state

    def is_done(self, model_id: str) -> bool:
        return model_id in self.state.records

    def skip(self, item: SkippedItem) -> None:
        if self.strict:
            raise ZooImportError(item.message)
        self.report.skipped.append(item)

    def validate(self, loaded: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """The checkpoint under our key names; `CheckpointProblem` if it does not fit, holds
        integers where the architecture has floats, or is not finite. The skipped item names the file;
        the reason names the model (``where``) and the parameter."""
        state_dict = match_architecture(loaded, self.expected, self.description)
        try:
            check_checkpoint_tensors(state_dict, self.float_keys, where)
        except ValueError as error:
            raise CheckpointProblem(str(error)) from None
        if state_dict.keys() != loaded.keys():
            note = f"renamed keys by position, e.g. {next(iter(loaded))!r} -> {next(iter(state_dict))!r}"
            if note not in self.report.notes:
                self.report.notes.append(note)
        return state_dict

    def write_checkpoint(self, state_dict: dict[str, torch.Tensor], record: dict) -> dict:
        file = write_checkpoint(self.output, record["model_id"], record["epoch"], state_dict)
        return {"file": file} | record

    def finish_model(self, model_id: str, records: list[dict], skipped: list[SkippedItem]) -> None:
        """Mark a model done; one without any good checkpoint is not, so a rerun retries it."""
        if not records:
            return
        progress = {
            "model_id": model_id,
            "records": records,
            "skipped": [asdict(s) for s in skipped],
        }
        atomic_write_text(self.progress_dir / f"{model_id}.json", json.dumps(progress) + "\n")
        self.state.records[model_id] = records
        self.state.skipped[model_id] = skipped
        self.report.models[model_id] = [record["epoch"] for record in records]

    def finish(self, zoo_info: dict[str, Any]) -> None:
        """Write ``metadata.jsonl``, ``zoo.json`` and the report of everything imported so far."""
        records = [
            record
            for model_id in sorted(self.state.records)
            for record in sorted(self.state.records[model_id], key=lambda r: r["epoch"])
        ]
        if not records:
            raise ZooImportError(
                f"no checkpoint of {self.report.source} could be imported:\n{self.report.summary()}"
            )
        zoo_info = {"kind": infer_zoo_kind(records)} | zoo_info
        zoo_info["epochs"] = sorted({record["epoch"] for record in records})
        # the models this zoo holds (a source's own count would include the skipped ones and
        # make the dataset builder take the zoo for an unfinished one)
        zoo_info["num_models"] = len(self.state.records)
        resumed_skips = []
        for model_id in self.report.resumed_models:
            self.report.models[model_id] = [
                record["epoch"] for record in self.state.records[model_id]
            ]
            resumed_skips += self.state.skipped.get(model_id, [])
        self.report.models = dict(sorted(self.report.models.items()))
        self.report.skipped = resumed_skips + self.report.skipped
        write_zoo_metadata(self.output, records)
        write_zoo_info(self.output, zoo_info)
        self.report.save(self.output / REPORT_FILE)
        shutil.rmtree(self.progress_dir, ignore_errors=True)


def infer_zoo_kind(records: list[dict]) -> str:
    """``"seed"`` if all models share the common hyperparameters, else ``"hyperparameter"``."""
    settings = {
        json.dumps({name: record["hyperparameters"].get(name) for name in HYPERPARAMETER_ALIASES})
        for record in records
    }
    return "seed" if len(settings) == 1 else "hyperparameter"


class _ModelImport:
    """Collects the records and skips of one model, reporting each skip to the writer."""

    def __init__(self, writer: _ZooWriter, model_id: str):
        self.writer = writer
        self.model_id = model_id
        self.records: list[dict] = []
        self.skipped: list[SkippedItem] = []

    def skip(self, path: Path | str, reason: str, epoch: int | None = None) -> None:
        item = SkippedItem(str(path), reason, self.model_id, epoch)
        self.writer.skip(item)
        self.skipped.append(item)

    def add(
        self,
        loaded: dict[str, torch.Tensor],
        epoch: int,
        seed: int,
        properties: dict[str, Any],
        hyperparameters: dict[str, Any],
        **extra: Any,
    ) -> None:
        """Validate one checkpoint and write it with its ``metadata.jsonl`` record."""
        state_dict = self.writer.validate(loaded, f"model {self.model_id}")
        record = {"model_id": self.model_id, "epoch": epoch, "seed": seed} | properties
        record |= {"hyperparameters": hyperparameters} | extra
        self.records.append(self.writer.write_checkpoint(state_dict, record))

    def finish(self) -> None:
        self.writer.finish_model(self.model_id, self.records, self.skipped)


def _import_ray_trials(source: Path, writer: _ZooWriter, progress: bool) -> None:
    """Import every trial folder of ``source``; model ids follow the sorted folder names."""
    trial_dirs = sorted(path for path in source.iterdir() if path.is_dir())
    width = max(4, len(str(len(trial_dirs) - 1)))
    for index, trial_dir in enumerate(
        tqdm(trial_dirs, desc="importing trials", disable=not progress)
    ):
        model = _ModelImport(writer, f"model_{index:0{width}d}")
        if writer.is_done(model.model_id):
            _check_same_source(writer, model.model_id, trial_dir.name)
            continue
        _import_trial(trial_dir, model)
        model.finish()


def _check_same_source(writer: _ZooWriter, model_id: str, trial_name: str) -> None:
    recorded = writer.state.records[model_id][0].get("source")
    if recorded != trial_name:
        raise ZooImportError(
            f"{writer.output} holds {model_id} imported from trial {recorded!r}, but that id now "
            f"belongs to {trial_name!r}: the source folder changed since the earlier import; "
            "import into a new output directory"
        )


def _import_trial(trial_dir: Path, model: _ModelImport) -> None:
    params = trial_dir / "params.json"
    _check_inside(trial_dir.parent, [params, trial_dir / "result.json"], model.model_id)
    if not params.is_file():
        model.skip(trial_dir.name, "not a trial folder: no params.json")
        return
    try:
        seed, hyperparameters = hyperparameters_from_config(json.loads(params.read_text()))
        results = read_result_lines(trial_dir)
    except (OSError, json.JSONDecodeError) as error:
        model.skip(trial_dir.name, f"unreadable params.json ({error})")
        return
    except CheckpointProblem as problem:
        model.skip(trial_dir.name, str(problem))
        return
    checkpoints = list(trial_checkpoints(trial_dir))
    if not checkpoints:
        model.skip(trial_dir.name, "no checkpoint_<epoch> folders")
    _check_inside(trial_dir.parent, [d / "checkpoints" for _, d in checkpoints], model.model_id)
    for epoch, checkpoint_dir in checkpoints:
        path = checkpoint_dir / "checkpoints"
        try:
            if epoch is None:
                raise CheckpointProblem("the folder name does not end in an epoch number")
            if epoch not in results:
                raise CheckpointProblem(
                    f"missing metrics: result.json has no line for epoch {epoch}"
                )
            properties = properties_from_metrics(results[epoch], f"result.json (epoch {epoch})")
            model.add(
                load_torch_checkpoint(path),
                epoch,
                seed,
                properties,
                hyperparameters,
                source=trial_dir.name,
            )
        except CheckpointProblem as problem:
            model.skip(path.relative_to(trial_dir.parent), str(problem), epoch)


# Keys of a raw metadata.jsonl line that are not metrics.
RECORD_KEYS = ("file", "model_id", "epoch", "seed", "hyperparameters", "metrics")


def _import_safetensors_folder(source: Path, writer: _ZooWriter, progress: bool) -> None:
    """Validate a raw zoo folder and copy its good checkpoints, model by model."""
    lines_by_model: dict[str, list[tuple[int, dict]]] = {}
    for number, line in enumerate(load_zoo_metadata(source), start=1):
        if not isinstance(line.get("model_id"), str):
            writer.skip(SkippedItem(f"{RAW_METADATA_FILE} line {number}", "no model_id"))
            continue
        _check_record_paths(source, [line], f"{source / RAW_METADATA_FILE} line {number}")
        lines_by_model.setdefault(line["model_id"], []).append((number, line))
    for model_id in tqdm(sorted(lines_by_model), desc="importing models", disable=not progress):
        if writer.is_done(model_id):
            continue
        model = _ModelImport(writer, model_id)
        for number, line in lines_by_model[model_id]:
            _import_safetensors_line(source, number, line, model)
        model.finish()


def _import_safetensors_line(source: Path, number: int, line: dict, model: _ModelImport) -> None:
    where = f"{RAW_METADATA_FILE} line {number}"
    epoch, seed, file = line.get("epoch"), line.get("seed"), line.get("file")
    try:
        for name, value, kind in (("epoch", epoch, int), ("seed", seed, int), ("file", file, str)):
            if not isinstance(value, kind):
                raise CheckpointProblem(f"{where}: {name} must be {kind.__name__}, got {value!r}")
        if epoch in {record["epoch"] for record in model.records}:
            raise CheckpointProblem(f"a second checkpoint of {model.model_id} at epoch {epoch}")
        metrics = {key: value for key, value in line.items() if key not in RECORD_KEYS}
        properties = properties_from_metrics(metrics, where)
        if extra := line.get("metrics", {}) | properties.get("metrics", {}):
            properties["metrics"] = extra
        path = resolve_in_zoo(source, file, where)
        loaded = load_safetensors_checkpoint(path)
        model.add(loaded, epoch, seed, properties, line.get("hyperparameters", {}))
    except CheckpointProblem as problem:
        model.skip(file if isinstance(file, str) else where, str(problem), epoch)


def _check_record_paths(root: Path, records: list[dict], where: str) -> None:
    """Refuse (`ZooImportError`) a record whose model id is not a safe file name or whose
    ``file`` leaves ``root``: such metadata is crafted or corrupt, never a zoo member to skip."""
    for record in records:
        try:
            check_model_id(record.get("model_id"), where)
            if "file" in record:
                resolve_in_zoo(root, record["file"], f"{where} (model_id {record['model_id']!r})")
        except ValueError as error:
            raise ZooImportError(str(error)) from None


def _check_inside(source: Path, paths: list[Path], model_id: str) -> None:
    """Refuse (`ZooImportError`) trial files that are symlinks leading out of ``source``."""
    for path in paths:
        try:
            resolve_in_zoo(source, str(path.relative_to(source)), f"model {model_id}")
        except ValueError as error:
            raise ZooImportError(str(error)) from None


def _resolve_zoo_info(
    source: Path,
    source_layout: str,
    architecture: str | None,
    architecture_kwargs: dict | None,
    zoo_info: dict | None,
) -> dict[str, Any]:
    info = load_zoo_info(source) if (source / ZOO_FILE).is_file() else {}
    if architecture is not None:
        info["architecture"] = architecture
    if architecture_kwargs is not None:
        info["architecture_kwargs"] = architecture_kwargs
    info.setdefault("architecture_kwargs", {})
    info |= zoo_info or {}
    info.setdefault("source_layout", source_layout)
    if "architecture" not in info:
        raise ValueError(
            f"{source} does not name its architecture ({ZOO_FILE} missing or without "
            "'architecture'): pass architecture='cnn_s' (and architecture_kwargs)"
        )
    return info


def import_zoo(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    architecture: str | None = None,
    architecture_kwargs: dict | None = None,
    zoo_info: dict | None = None,
    strict: bool = False,
    progress: bool = True,
) -> ImportReport:
    """Convert a zoo in the Ray-trial layout or a plain safetensors folder into a raw zoo directory.

    Args:
        source: a folder of Ray Tune trial folders, or a folder with ``metadata.jsonl`` and
            safetensors checkpoints (``file`` paths relative to the folder).
        output: the raw zoo directory to write (created; an earlier partial import there is
            continued).
        architecture, architecture_kwargs: the `build_model` name and shape-defining arguments
            every checkpoint must fit; needed for Ray trials, read from ``zoo.json`` otherwise.
        zoo_info: extra ``zoo.json`` entries (``dataset``, ``num_classes``, ``input_shape``...).
        strict: raise `ZooImportError` at the first problem instead of skipping.
        progress: show a progress bar.

    Returns:
        The `ImportReport`, also saved as ``import_report.json`` in ``output``.

    Raises:
        ZooImportError: with ``strict=True`` at the first problem; always for a model id or
            file path that would leave the source or output folder.
        ZooBusyError: another process is writing ``output``.
    """
    source, output = Path(source), Path(output)
    if not source.is_dir():
        raise FileNotFoundError(f"zoo source {source} is not a directory")
    if output.resolve() == source.resolve():
        raise ValueError(f"import into a new directory, not into the source {source} itself")
    source_layout = "safetensors" if (source / RAW_METADATA_FILE).is_file() else "ray_tune"
    info = _resolve_zoo_info(source, source_layout, architecture, architecture_kwargs, zoo_info)
    report = ImportReport(source=str(source), output=str(output), source_layout=source_layout)
    with zoo_writer_lock(output):
        writer = _ZooWriter(output, report, info, strict)
        importer = _import_ray_trials if source_layout == "ray_tune" else _import_safetensors_folder
        importer(source, writer, progress)
        writer.finish(info)
    return report


__all__ = [
    "ImportReport",
    "SkippedItem",
    "ZooImportError",
    "import_zoo",
]
