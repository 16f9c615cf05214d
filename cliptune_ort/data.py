"""Data loading and the BBT few-shot protocol.

Local data (the default) are JSON Lines files, one object per line with ``text``, ``label`` (int) and, for
pair tasks, ``text_b``; files may be gzipped (``*.jsonl.gz``). The vendored copy lives in
``cliptune_ort/assets/data/<task>/`` (see :func:`default_data_dir`); ``--data-dir`` points elsewhere.

Few-shot protocol (BBT, Sun et al. 2022; LM-BFF style): a seed shuffles the full train split; walking in that
order, the first ``per_class`` examples of each label are train and the next ``per_class`` of each label are
dev (:func:`bbt_sample`). Tasks whose full train split is not offline (ag_news, dbpedia, yelp_polarity) use
the fixed RLPrompt splits ``fewshot_rlprompt/<per_class>-<seed>/{train,dev}.jsonl`` instead. The test split
is the task's original evaluation split (``TaskSpec.local_test`` / ``TaskSpec.hub_test_split``). A task file
(``--task my_task.json``) names its own files, relative to itself: a train file sampled as above, or train and
dev files used whole (``fewshot == "given"``); they may be CSV or TSV files with a header row, their fields may
have other names (``TaskSpec.columns``), and their rows' labels may be label names.

Only numpy is imported at module load; ``datasets`` is imported lazily by :func:`load_hub_split`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import warnings
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cliptune_ort.errors import ConfigError, DataError
from cliptune_ort.tasks import TaskSpec, get_task

#: Folder (under a task's data folder) holding predrawn few-shot splits as ``<per_class>-<seed>/``.
PREDRAWN_DIR = "fewshot_rlprompt"
#: Hub split the few-shot train/dev sets are sampled from when ``source="hub"``.
HUB_TRAIN_SPLIT = "train"
#: Hub column holding the integer label (the same for all seven tasks).
HUB_LABEL = "label"

_SPLIT_PART = re.compile(r"^[A-Za-z0-9_\-.]+$")


@dataclass(frozen=True)
class Example:
    """One labelled example: ``text`` (and ``text_b`` for pair tasks) with its label id."""

    text: str
    label: int
    text_b: str | None = None


@dataclass
class FewShot:
    """A few-shot task instance.

    Fields:
        train: ``per_class * labels`` examples the prompt is optimised on (walk order of the sampler).
        dev: ``per_class * labels`` examples that select the prompt, disjoint from train.
        test: the evaluation split, or None where none is available (``info["test_note"]`` says why).
        info: JSON-serialisable record of how the split was made: ``task``, ``seed``, ``per_class``,
            ``source`` ("local"/"hub"), ``data_dir`` (str or None), ``fewshot`` ("sampled"/"predrawn"),
            ``train_source`` / ``test_source`` (file or hub split), ``train_counts`` / ``dev_counts`` /
            ``test_counts`` (examples per label id, lists of length labels; test_counts None without test),
            ``test_note``, ``train_note``; for sampled splits also ``pool_size`` (examples sampled from),
            ``dropped_rows`` (rows without a gold label removed first) and ``train_indices`` /
            ``dev_indices`` (positions of the chosen examples in that pool).
    """

    train: list[Example]
    dev: list[Example]
    test: list[Example] | None
    info: dict[str, Any]


def default_data_dir() -> Path:
    """The vendored data folder, ``cliptune_ort/assets/data`` (next to this file)."""
    return Path(__file__).resolve().parent / "assets" / "data"


def _spec(task: str | TaskSpec) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else get_task(task)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed {seed!r}: expected an int in 0..2**32-1 (numpy RandomState); pass --seed "
                          "with such a value, e.g. 13, 21, 42, 87 or 100")
    return int(seed)


def _check_per_class(per_class: int) -> int:
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ConfigError(f"per_class {per_class!r}: expected a positive int (examples per label in train "
                          "and in dev, 16 in BBT)")
    return int(per_class)


_SCAN = json.JSONDecoder().scan_once  # the C scanner behind json.loads, without its per-call wrapping
_JSON_SPACE = " \t\r\n"


def _parse_line(path: Path, lineno: int, line: str) -> Any:
    """``json.loads(line)``, through the decoder's scanner: SST-2's 67,349 rows in about 0.1 s against
    0.2 s for ``json.loads``. A line the scanner does not read whole (invalid, extra data) goes to
    ``json.loads``, whose error names the line."""
    s = line.strip(_JSON_SPACE)  # the whitespace json.loads skips around a value
    try:
        value, end = _SCAN(s, 0)
    except (StopIteration, json.JSONDecodeError):
        end = -1
    if end == len(s):
        return value
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: expected one JSON object per line, found invalid JSON "
                        f"({e.msg} at column {e.colno}); fix or remove that line") from e


#: the default names of a data row's fields: its text, its second text (pair tasks) and its label
DEFAULT_COLUMNS = ("text", "text_b", "label")
#: file endings read as delimited text (a task file's own data), with their delimiter
_DELIMITED = {".csv": ",", ".tsv": "\t"}
_INT = re.compile(r"^-?[0-9]+$")


@dataclass(frozen=True)
class Hints:
    """How a data error tells its reader to fix things: the vendored data's files are restored, a user's own
    files (a task file's, ``--input``) are fixed."""

    missing: str = "expected a JSON Lines file there (pass --data-dir pointing at a folder with one sub-folder per task)"
    fix: str = "restore the file (check it against SHA256SUMS)"
    ids: str = "use the task's label ids (see the task's README)"
    few: str = "use a larger train split or a smaller per_class"


VENDORED = Hints()
OWN = Hints(missing="expected a JSON Lines file there (fix its path in the task file: paths are relative to the task "
                    "file's folder)",
            fix="fix the file", ids="use ids in label_names order, or the label names",
            few='add examples, lower --per-class, or give the task file a "dev" file to use train and dev whole')


def hints_for(spec: TaskSpec) -> Hints:
    """A task file's data are the user's own; the built-in tasks' are the vendored copies."""
    return VENDORED if spec.source_file is None else OWN


def _delimiter(path: Path) -> str | None:
    name = path.name.removesuffix(".gz")
    return next((d for ext, d in _DELIMITED.items() if name.lower().endswith(ext)), None)


def _read_text(path: Path, hints: Hints = VENDORED) -> str:
    """A data file's text: read, gunzipped where its name ends in .gz, decoded as strict UTF-8."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found; {hints.missing}")
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        kind = "CSV/TSV" if _delimiter(path) else "JSON Lines"
        raise DataError(f"{path}: expected a gzip-compressed {kind} file, found a corrupt or truncated "
                        f"gzip stream ({e}); {hints.fix}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e}); check that it is a readable file") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: expected UTF-8 text, found invalid byte(s) "
                        f"{raw[e.start:e.end]!r}; re-encode the file as UTF-8") from e


def _records(path: Path, content: str, columns: Sequence[str], need: Sequence[str] | None = None):
    """(line number, row dict) of each record: a JSON object per line, or a CSV/TSV row under its header (which
    must name the columns ``need``, default the text and the label)."""
    delimiter = _delimiter(path)
    if delimiter is None:
        # split("\n"), not splitlines(): U+2028 and friends may legally occur inside JSON strings.
        for lineno, line in enumerate(content.split("\n"), start=1):
            if not line.strip():
                continue
            row = _parse_line(path, lineno, line)
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, found a JSON "
                                f"{type(row).__name__}; write one {{\"text\": ..., \"label\": ...}} object per line")
            yield lineno, row
        return
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter=delimiter, strict=True)
    try:
        header = reader.fieldnames or []
        missing = [c for c in (need or (columns[0], columns[2])) if c not in header]
        if header and missing:
            raise DataError(f"{path}:1: expected a header row naming the columns {missing}, found {header}; add them "
                            "or map yours with the task file's \"columns\"")
        for row in reader:
            if None in row:  # DictReader's key for fields beyond the header
                raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields as in the header, found "
                                f"{len(header) + len(row[None])}; quote a text that holds the delimiter")
            if None in row.values() and any(row.values()):
                raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields as in the header, found "
                                f"{sum(v is not None for v in row.values())}; fix that row")
            if any(row.values()):  # a blank line is no record
                yield reader.line_num, row
    except csv.Error as e:
        raise DataError(f"{path}: expected {'CSV' if delimiter == ',' else 'TSV'} rows, found malformed quoting after "
                        f"line {reader.line_num} ({e}); close or escape (\"\") the quotes there") from e


def _read_jsonl(
    path: Path, n_labels: int | None, pair: bool, drop_labels: Collection[int],
    label_names: Sequence[str] | None = None, columns: Sequence[str] = DEFAULT_COLUMNS, hints: Hints = VENDORED,
) -> tuple[list[dict[str, Any]], int]:
    """:func:`read_jsonl`'s work; also returns how many rows were dropped (label in drop_labels)."""
    label_ids = {n: i for i, n in enumerate(label_names)} if label_names else {}
    text_col, text_b_col, label_col = columns
    delimited = _delimiter(path) is not None
    drop = frozenset(drop_labels)
    rows: list[dict[str, Any]] = []
    n_objects = 0
    for lineno, row in _records(path, _read_text(path, hints), columns):
        n_objects += 1
        label = row.get(label_col)
        if type(label) is str and label_ids and label in label_ids:  # a label name: its id
            label = label_ids[label]
        elif type(label) is str and label_ids and not delimited:
            raise DataError(f"{path}:{lineno}: expected a label id or one of the label names "
                            f"{list(label_ids)}, found {label!r:.60}; fix the row or the task's label_names")
        elif type(label) is str and delimited and _INT.match(label.strip()):  # CSV/TSV: all fields are text
            label = int(label)
        if type(label) is not int:  # bool is an int subclass: rejected too
            found = f"no {label_col!r} field" if label_col not in row else f"label {label!r:.60}"
            raise DataError(f"{path}:{lineno}: expected an int {label_col!r} field, found {found}; labels must be "
                            "integer class ids" + (f" or one of the label names {list(label_ids)}" if label_ids else ""))
        if label in drop:
            continue
        if n_labels is not None and not 0 <= label < n_labels:
            raise DataError(f"{path}:{lineno}: expected a label in 0..{n_labels - 1}, found {label}; {hints.ids}")
        text = row.get(text_col)
        if not isinstance(text, str):
            found = f"no {text_col!r} field" if text_col not in row else f"{type(text).__name__} {text!r:.40}"
            raise DataError(f"{path}:{lineno}: expected a string {text_col!r} field, found {found}; "
                            f"every row needs its input text in {text_col!r}")
        text_b = None
        if pair:
            text_b = row.get(text_b_col)
            if not isinstance(text_b, str):
                found = (f"no {text_b_col!r} field" if text_b_col not in row
                         else f"{type(text_b).__name__} {text_b!r:.40}")
                raise DataError(f"{path}:{lineno}: expected a string {text_b_col!r} field (sentence-pair task), "
                                f"found {found}; every row needs its second sentence in {text_b_col!r}")
        if (text_col, text_b_col, label_col) != DEFAULT_COLUMNS or delimited:
            row = {**row, "text": text, "label": label, **({"text_b": text_b} if pair else {})}
        else:
            row["label"] = label
        rows.append(row)
    if n_objects == 0:
        raise DataError(f"{path}: expected {'CSV/TSV' if delimited else 'JSON Lines'} rows, found an empty file; "
                        f"{hints.fix}")
    return rows, n_objects - len(rows)


def read_texts(
    path: str | os.PathLike[str], pair: bool = False, columns: Sequence[str] = DEFAULT_COLUMNS
) -> tuple[list[str], list[str] | None]:
    """Texts to classify, from a file: ``.txt`` (one text per non-blank line; single-text tasks), or JSON Lines,
    CSV or TSV rows (optionally gzipped) holding the text field (and the second text for a pair task) under
    ``columns``' names; other fields, a label among them, are ignored. Returns ``(texts, texts_b or None)``.

    Raises:
        DataError: one line naming the file (and line): not found, unreadable, not UTF-8, a row without its
            text field(s), no text at all.
    """
    path = Path(path)
    content = _read_text(path, replace(
        OWN, missing="expected a file of texts there (.txt, .jsonl, .csv or .tsv); check the path"))
    name = path.name.removesuffix(".gz").lower()
    text_col, text_b_col = columns[0], columns[1]
    texts: list[str] = []
    texts_b: list[str] = []
    if name.endswith(".txt"):
        if pair:
            raise DataError(f"{path}: a pair task needs two texts per example: give a JSON Lines, CSV or TSV file with "
                            f"{text_col!r} and {text_b_col!r} fields instead of plain lines")
        texts = [line.rstrip("\r") for line in content.split("\n") if line.strip()]
    else:
        need = (text_col, text_b_col) if pair else (text_col,)
        for lineno, row in _records(path, content, columns, need=need):
            for col, out in zip(need, (texts, texts_b)):
                value = row.get(col)
                if not isinstance(value, str):
                    found = f"no {col!r} field" if col not in row else f"{type(value).__name__} {value!r:.40}"
                    raise DataError(f"{path}:{lineno}: expected a string {col!r} field, found {found}; every row "
                                    f"needs its text in {col!r}")
                out.append(value)
    if not texts:
        raise DataError(f"{path}: expected texts to classify, found none; add one per line (or row)")
    return texts, (texts_b if pair else None)


def read_jsonl(
    path: str | os.PathLike[str],
    *,
    n_labels: int | None = None,
    pair: bool = False,
    drop_labels: Collection[int] = (),
    label_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Read and validate a JSON Lines file (``.jsonl``, or gzipped when the name ends in ``.gz``).

    Each non-blank line must be a JSON object with a string ``text`` and an int ``label`` (in
    ``range(n_labels)`` when ``n_labels`` is given; with ``label_names``, a label may also be one of those
    names, and the returned row holds its id), plus a string ``text_b`` when ``pair`` is true. Rows
    whose label is in ``drop_labels`` (SNLI's -1 = no gold label) are skipped. The file must be strict
    UTF-8 and hold at least one row.

    Why plain ``json`` + ``gzip`` (the default path for local files): the file is read and decoded once
    and parsed line by line, which loads SST-2's 67k-row train split in ~0.25 s and writes nothing.
    ``datasets`` would build and cache an Arrow table on first use (seconds, plus files under
    ``~/.cache``) and is a heavy import, for no gain at these sizes.

    Returns:
        The kept rows as dicts in file order (every field of a row, not only the checked ones).

    Raises:
        DataError: one line naming the file (and line number where there is one) for a missing or
            unreadable file, a corrupt gzip stream, non-UTF-8 bytes, a line that is not a JSON object, a
            missing or mistyped field, a label out of range, or an empty file.
    """
    rows, _ = _read_jsonl(Path(path), n_labels, pair, drop_labels, label_names)
    return rows


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    root = default_data_dir() if data_dir is None else Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} not found; expected a folder with one sub-folder per task "
                        "(sst2/, mrpc/, ...); pass --data-dir pointing at it")
    return root


def _task_dir(spec: TaskSpec, data_dir: str | os.PathLike[str] | None) -> Path:
    if spec.source_file is not None:  # a task file: its paths are relative to its own folder
        if data_dir is not None:
            raise ConfigError(f"--data-dir does not apply to task file {spec.source_file}: its data paths are "
                              "relative to the file's folder; drop --data-dir")
        return Path(spec.local_dir)
    folder = _resolve_data_dir(data_dir) / spec.local_dir
    if not folder.is_dir():
        raise DataError(f"task folder {folder} not found; expected the {spec.name} data in "
                        f"<data-dir>/{spec.local_dir}/; pass --data-dir pointing at a folder that has it")
    return folder


def _load_local(spec: TaskSpec, path: Path, hints: Hints | None = None) -> tuple[list[Example], int]:
    """Examples of one local file of ``spec`` and the number of rows dropped for having no gold label."""
    hints = hints or hints_for(spec)
    rows, dropped = _read_jsonl(path, spec.n_labels, spec.pair, spec.drop_labels, spec.label_names, spec.columns,
                                hints)
    if not rows:
        raise DataError(f"{path}: expected at least one labelled example, found none (all {dropped} rows "
                        f"have a label in {sorted(spec.drop_labels)}); {hints.fix}")
    if spec.pair:
        return [Example(r["text"], r["label"], r["text_b"]) for r in rows], dropped
    return [Example(r["text"], r["label"]) for r in rows], dropped


def load_labelled(task: str | TaskSpec, path: str | os.PathLike[str]) -> list[Example]:
    """Labelled examples of any file in ``task``'s format (JSON Lines, CSV or TSV; its label names, columns and
    pair fields), e.g. a held-out set to evaluate a tuned prompt on."""
    spec, path = _spec(task), Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found; expected a file of labelled examples there (.jsonl, .csv or "
                        ".tsv); check the path")
    return _load_local(spec, path, OWN)[0]


def _split_path(spec: TaskSpec, folder: Path, split: str) -> Path:
    """Local file of ``split``: "train"/"test" through the spec, else ``<split>`` or ``<split>.jsonl[.gz]``."""
    if split == "train":
        if spec.local_train is None:
            raise DataError(f"task {spec.name!r} has no full train split offline (its few-shot splits are "
                            f"predrawn in {folder / PREDRAWN_DIR}); use load_fewshot, or source='hub'")
        return folder / spec.local_train
    if split == "test":
        if spec.local_test is None:
            raise DataError(f"task {spec.name!r}: {spec.test_note}")
        return folder / spec.local_test
    parts = split.split("/") if isinstance(split, str) else [""]
    if not all(_SPLIT_PART.match(p) and p not in (".", "..") for p in parts):
        raise DataError(f"split {split!r}: expected 'train', 'test' or a file under {folder}, with or without "
                        "its .jsonl[.gz] extension (letters, digits, '_', '-', '.', '/'; no '..')")
    for suffix in ("", ".jsonl", ".jsonl.gz"):
        candidate = folder / f"{split}{suffix}"
        if candidate.name.endswith((".jsonl", ".jsonl.gz")) and candidate.is_file():
            return candidate
    available = sorted(f.relative_to(folder).as_posix().split(".jsonl")[0] for f in folder.rglob("*.jsonl*"))
    raise DataError(f"split {split!r} of task {spec.name!r}: expected {folder / split}.jsonl[.gz], not "
                    f"found; available: train, test, {', '.join(available)}")


def load_split(
    task: str | TaskSpec, split: str, data_dir: str | os.PathLike[str] | None = None
) -> list[Example]:
    """Load one local split of ``task`` as a list of :class:`Example` (file order).

    ``split`` is "train" (the spec's full train file, e.g. ``sst2/train.jsonl.gz``), "test" (the spec's
    evaluation file, e.g. GLUE ``validation.jsonl`` for sst2) or a file under the task folder, with or
    without its extension (e.g. "validation", "fewshot_rlprompt/16-13/dev", "test.jsonl" for MRPC's
    labelled MSR test file, which is not BBT's test split). Rows without a gold label (SNLI -1)
    are dropped. ``data_dir`` defaults to :func:`default_data_dir`.

    Raises:
        DataError: missing data dir / task folder / file, malformed file, or no examples.
        TaskError: unknown task name.
    """
    spec = _spec(task)
    folder = _task_dir(spec, data_dir)
    return _load_local(spec, _split_path(spec, folder, split))[0]


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}"


def _load_hub(spec: TaskSpec, split: str) -> tuple[list[Example], int, str]:
    """Examples of a hub split, rows dropped for having no gold label, and a description of the source."""
    if not spec.hub_path:
        raise DataError(f"task file {spec.source_file} names no hub dataset: add \"hub_path\" (and \"hub_text\", "
                        "\"hub_config\", ...) to it, or use its local files (--data-source local)")
    hub_split = spec.hub_test_split if split == "test" else split
    where = f"hub dataset {spec.hub_path}" + (f"/{spec.hub_config}" if spec.hub_config else "")
    where += f" split {hub_split!r}"
    try:
        import datasets  # lazy: heavy import, only needed online
    except ImportError as e:
        raise DataError(f"{where}: source='hub' needs the 'datasets' package, which is not installed; "
                        "pip install datasets, or use the local data (source='local')") from e
    try:
        ds = datasets.load_dataset(spec.hub_path, spec.hub_config, split=hub_split)
    except Exception as e:  # network errors (OSError, httpx), dataset/split not found, offline mode, ...
        raise DataError(f"{where}: could not be loaded ({_one_line(e)}); check the network, or use the "
                        "local data (source='local')") from e

    columns = [spec.hub_text, HUB_LABEL] + ([spec.hub_text_b] if spec.hub_text_b else [])
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: expected columns {columns}, found {ds.column_names} (missing {missing}); "
                        "the hub dataset changed: use the local data (source='local')")
    names = getattr(ds.features[HUB_LABEL], "names", None)
    if names is not None and tuple(names) != spec.label_names:
        raise DataError(f"{where}: expected label names {list(spec.label_names)}, found {list(names)}; the "
                        "label ids would not match the verbalizer: use the local data (source='local')")

    texts = list(ds[spec.hub_text])
    labels = list(ds[HUB_LABEL])
    texts_b = list(ds[spec.hub_text_b]) if spec.hub_text_b else [None] * len(texts)
    drop = frozenset(spec.drop_labels)
    examples: list[Example] = []
    for i, (text, label, text_b) in enumerate(zip(texts, labels, texts_b)):
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise DataError(f"{where} row {i}: expected an int label, found {label!r}; use source='local'")
        label = int(label)
        if label in drop:
            continue
        if not 0 <= label < spec.n_labels:
            raise DataError(f"{where} row {i}: expected a label in 0..{spec.n_labels - 1}, found {label}; "
                            "use source='local'")
        if not isinstance(text, str) or (spec.pair and not isinstance(text_b, str)):
            raise DataError(f"{where} row {i}: expected string text column(s) {columns[::2]}, found "
                            f"{type(text).__name__}/{type(text_b).__name__}; use source='local'")
        examples.append(Example(text, label, text_b))
    if not examples:
        raise DataError(f"{where}: expected at least one labelled example, found an empty split; "
                        "use the local data (source='local')")
    return examples, len(texts) - len(examples), where


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it may be (a fast check before a hub load).

    Without it an offline machine waits ~25 s in ``huggingface_hub``'s retries before failing. Only the host
    name is resolved (no connection); the check is skipped (None) in offline mode (``HF_HUB_OFFLINE`` /
    ``HF_DATASETS_OFFLINE``: ``datasets`` then fails fast or uses its cache) and behind a proxy.
    """
    import socket
    from urllib.parse import urlparse

    skip = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
            "ALL_PROXY", "all_proxy")
    if any(os.environ.get(v) for v in skip):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"cannot resolve {host}: {e}"
    return None


def load_hub_split(task: str | TaskSpec, split: str) -> list[Example]:
    """Load one split of ``task`` from the Hugging Face hub (needs ``datasets`` and a network).

    ``split`` is "test" (the spec's ``hub_test_split``: GLUE "validation" for sst2/mrpc/rte, "test"
    elsewhere) or a hub split name ("train", "validation", ...). Columns are mapped to :class:`Example`
    via ``hub_text`` / ``hub_text_b`` / "label"; the dataset's label names must equal the spec's
    ``label_names``; rows without a gold label (SNLI -1) are dropped. Texts are kept as the hub has them.

    Raises:
        DataError: ``datasets`` missing, the dataset or split cannot be loaded, unexpected columns or label
            names, a bad label, or an empty split.
    """
    return _load_hub(_spec(task), split)[0]


def bbt_sample_indices(
    labels: Sequence[int], n_labels: int, seed: int, per_class: int = 16, hints: Hints = VENDORED
) -> tuple[list[int], list[int]]:
    """BBT's few-shot sampler on a list of label ids; returns ``(train_indices, dev_indices)``.

    ``rng = np.random.RandomState(seed)`` permutes ``range(len(labels))``; walking in that order, the first
    ``per_class`` indices of each label go to train and the next ``per_class`` to dev. This equals BBT's
    ``np.random.seed(seed); np.random.shuffle(all_indices)`` walk. Both lists have
    ``per_class * n_labels`` indices, in walk order, and are disjoint. Deterministic in ``seed``.

    Raises:
        DataError: a label outside ``range(n_labels)``, or a label with fewer than ``2 * per_class``
            examples.
        ConfigError: a seed outside 0..2**32-1, a per_class < 1 or an n_labels < 1.
    """
    seed = _check_seed(seed)
    per_class = _check_per_class(per_class)
    if isinstance(n_labels, bool) or not isinstance(n_labels, (int, np.integer)) or n_labels < 1:
        raise ConfigError(f"n_labels {n_labels!r}: expected a positive int (the task's number of classes)")
    lab = np.asarray(labels)
    if lab.ndim != 1 or (lab.size and not np.issubdtype(lab.dtype, np.integer)):
        raise DataError(f"few-shot sampling: expected a flat list of int label ids, found an array of "
                        f"shape {lab.shape} and dtype {lab.dtype}")
    if lab.size and (lab.min() < 0 or lab.max() >= n_labels):
        bad = int(lab.min()) if lab.min() < 0 else int(lab.max())
        raise DataError(f"few-shot sampling: expected label ids in 0..{n_labels - 1}, found {bad}; drop "
                        "rows without a gold label before sampling")
    counts = np.bincount(lab.astype(np.int64), minlength=n_labels) if lab.size else np.zeros(n_labels, int)
    short = {c: int(counts[c]) for c in range(n_labels) if counts[c] < 2 * per_class}
    if short:
        raise DataError(f"few-shot sampling: expected at least {2 * per_class} examples of every label "
                        f"({per_class} train + {per_class} dev), found {short} (label: count); {hints.few}")

    label_list = lab.tolist()
    train_left = [per_class] * n_labels
    dev_left = [per_class] * n_labels
    remaining = 2 * per_class * n_labels
    train: list[int] = []
    dev: list[int] = []
    for i in np.random.RandomState(seed).permutation(len(label_list)).tolist():
        c = label_list[i]
        if train_left[c]:
            train_left[c] -= 1
            train.append(i)
        elif dev_left[c]:
            dev_left[c] -= 1
            dev.append(i)
        else:
            continue
        remaining -= 1
        if remaining == 0:
            break
    return train, dev


def bbt_sample(
    examples: Sequence[Example], n_labels: int, seed: int, per_class: int = 16
) -> tuple[list[Example], list[Example]]:
    """BBT / LM-BFF few-shot split of a full train split: ``(train, dev)``, each ``per_class * n_labels``.

    See :func:`bbt_sample_indices` for the procedure (seeded permutation, first ``per_class`` of each label
    to train, next ``per_class`` to dev). Same seed, same split.
    """
    train_idx, dev_idx = bbt_sample_indices([e.label for e in examples], n_labels, seed, per_class)
    return [examples[i] for i in train_idx], [examples[i] for i in dev_idx]


def _counts(examples: Sequence[Example], n_labels: int) -> list[int]:
    return np.bincount([e.label for e in examples], minlength=n_labels).tolist() if examples else [0] * n_labels


def _predrawn(spec: TaskSpec, folder: Path, seed: int, per_class: int) -> tuple[list[Example], list[Example], Path]:
    base = folder / PREDRAWN_DIR
    pdir = base / f"{per_class}-{seed}"
    if not pdir.is_dir():
        seeds = sorted(int(d.name.split("-", 1)[1]) for d in base.glob(f"{per_class}-*")
                       if d.is_dir() and d.name.split("-", 1)[1].isdigit()) if base.is_dir() else []
        if not seeds:  # no split of this size at all: the size is what to change
            shots = sorted({d.name.split("-", 1)[0] for d in base.glob("*-*") if d.is_dir()}) if base.is_dir() else []
            raise DataError(f"task {spec.name!r} has no predrawn {per_class}-shot splits (expected {pdir}); "
                            f"available: {', '.join(s + '-shot' for s in shots) or 'none'}; pass --per-class with "
                            "one of these, or use --data-source hub to sample from the full train split")
        raise DataError(f"task {spec.name!r} has no predrawn {per_class}-shot split for seed {seed} (expected "
                        f"{pdir}); available seeds: {', '.join(map(str, seeds))}; pass --seed with one of these, or "
                        "use --data-source hub to sample from the full train split")
    train = _load_local(spec, pdir / "train.jsonl")[0]
    dev = _load_local(spec, pdir / "dev.jsonl")[0]
    for name, part in (("train", train), ("dev", dev)):
        counts = _counts(part, spec.n_labels)
        if any(c != per_class for c in counts):
            raise DataError(f"{pdir / name}.jsonl: expected {per_class} examples of every label, found "
                            f"{counts} (per label id); restore the file (check it against SHA256SUMS)")
    return train, dev, pdir


def _source(spec: TaskSpec, folder: Path, path: Path) -> str:
    """How ``info`` names a data file: under the data dir for a built-in task, whole for a task file's."""
    if spec.source_file is not None:
        return os.path.normpath(path)
    return path.relative_to(folder.parent).as_posix()


#: a task file's train or dev file used whole with more rows than this gets a warning (each candidate scores them)
GIVEN_ROWS_WARN = 1000


def _given(spec: TaskSpec, folder: Path, split: str) -> list[Example]:
    """A task file's train or dev file, whole; every label must occur (a prompt learns nothing about a label
    its train set lacks, and dev could not select for it)."""
    path = folder / (spec.local_train if split == "train" else spec.local_dev)
    examples = _load_local(spec, path)[0]
    if len(examples) > GIVEN_ROWS_WARN:
        cost = ("every candidate is scored on all of them" if split == "train" else
                "every dev evaluation (each --eval-every calls) scores all of them")
        warnings.warn(f"{path}: {len(examples):,} {split} examples, used whole: {cost}; Clip-Tuning is few-shot: drop "
                      "\"dev\" from the task file to draw --per-class examples per label from train instead "
                      "(`cliptune bench` projects the run's time)", RuntimeWarning, stacklevel=3)
    counts = _counts(examples, spec.n_labels)
    if not all(counts):
        raise DataError(f"{path}: expected at least one {split} example of every label, found {counts} (per label "
                        f"id: {', '.join(spec.label_names)}); add examples of the missing labels")
    return examples


def load_fewshot(
    task_name_or_spec: str | TaskSpec,
    seed: int,
    data_dir: str | os.PathLike[str] | None = None,
    per_class: int = 16,
    source: str = "local",
) -> FewShot:
    """Build the few-shot train/dev split and the test split of a task (BBT protocol).

    ``source="local"`` (default): tasks with ``fewshot == "sample"`` (sst2, mrpc, rte, snli) run
    :func:`bbt_sample` with ``seed`` over the local train file (for snli the first 100k train lines, see
    ``info["train_note"]``); ``"predrawn"`` tasks (ag_news, dbpedia, yelp_polarity) read
    ``fewshot_rlprompt/<per_class>-<seed>/{train,dev}.jsonl`` (seeds 13, 21, 42, 87, 100 ship). Test is
    the spec's local test file, or None where none is offline (yelp_polarity). ``source="hub"``: samples
    every task from the hub's full train split and tests on the hub's test split.

    Returns:
        :class:`FewShot` with ``per_class * labels`` train and dev examples and ``info`` describing them.

    Raises:
        DataError: missing data dir or file, a predrawn seed that does not exist, a malformed or empty split,
            too few examples of a label.
        ConfigError: bad ``seed`` / ``per_class`` / ``source``.
        TaskError: unknown task name.
    """
    spec = _spec(task_name_or_spec)
    seed = _check_seed(seed)
    per_class = _check_per_class(per_class)
    if source not in ("local", "hub"):
        raise ConfigError(f"source {source!r}: expected 'local' (the data folder) or 'hub' (Hugging Face hub)")

    info: dict[str, Any] = {"task": spec.name, "seed": seed, "per_class": per_class, "source": source}
    test: list[Example] | None
    if source == "hub":
        pool, dropped, where = _load_hub(spec, HUB_TRAIN_SPLIT)
        train_idx, dev_idx = bbt_sample_indices([e.label for e in pool], spec.n_labels, seed, per_class)
        test, _, test_where = _load_hub(spec, "test")
        info.update(data_dir=None, fewshot="sampled", train_source=where, test_source=test_where,
                    train_note="", test_note=f"hub split {spec.hub_test_split!r}, BBT's test split")
    else:
        folder = _task_dir(spec, data_dir)
        info.update(data_dir=str(folder if spec.source_file else folder.parent), train_note=spec.train_note,
                    test_note=spec.test_note)
        if spec.fewshot == "sample":
            path = _split_path(spec, folder, "train")
            pool, dropped = _load_local(spec, path)
            train_idx, dev_idx = bbt_sample_indices([e.label for e in pool], spec.n_labels, seed, per_class,
                                                    hints_for(spec))
            info.update(fewshot="sampled", train_source=_source(spec, folder, path))
        elif spec.fewshot == "given":  # a task file's own train and dev files, used whole
            train = _given(spec, folder, "train")
            dev = _given(spec, folder, "dev")
            info.update(fewshot="given", train_source=_source(spec, folder, folder / spec.local_train),
                        dev_source=_source(spec, folder, folder / spec.local_dev))
        else:
            train, dev, pdir = _predrawn(spec, folder, seed, per_class)
            info.update(fewshot="predrawn", train_source=pdir.relative_to(folder.parent).as_posix())
        if spec.local_test is None:
            test = None
            info["test_source"] = None
        else:
            test_path = _split_path(spec, folder, "test")
            test = _load_local(spec, test_path)[0]
            info["test_source"] = _source(spec, folder, test_path)

    if info["fewshot"] == "sampled":
        train = [pool[i] for i in train_idx]
        dev = [pool[i] for i in dev_idx]
        info.update(pool_size=len(pool), dropped_rows=dropped, train_indices=train_idx, dev_indices=dev_idx)
    info.update(
        train_counts=_counts(train, spec.n_labels),
        dev_counts=_counts(dev, spec.n_labels),
        test_counts=None if test is None else _counts(test, spec.n_labels),
    )
    return FewShot(train=train, dev=dev, test=test, info=info)
