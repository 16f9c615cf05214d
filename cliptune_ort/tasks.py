"""The task table: the seven Clip-Tuning / BBT benchmarks as data.

Tasks are data, not classes: one frozen :class:`TaskSpec` per task in :data:`TASKS`, looked up with
:func:`get_task`. A spec says how an example becomes a prompt (``template``, ``verbalizer``), how a
candidate is scored (``loss``, ``metric``), where the data comes from (the vendored offline copy under
``cliptune_ort/assets/data/<local_dir>`` or the Hugging Face hub) and how the few-shot split is made.

A user's own task is a task file (``*.json``, :func:`load_task_file`), which ``get_task`` reads when given its
path: the same spec, its data paths relative to the file, its few-shot split drawn by BBT's sampler or given
whole as train and dev files.

Templates and verbalizers are BBT's (Sun et al., 2022), see DESIGN.md. Label ids follow the Hugging Face
``datasets`` conventions (the vendored data uses the same ids; each task's README in the data folder states
the mapping), and ``verbalizer[i]`` / ``label_names[i]`` belong to label id ``i``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cliptune_ort.errors import TaskError

#: Placeholder in templates for the L prompt positions.
PROMPT_TOKEN = "<P>"
#: Placeholder in templates for the masked position whose logits are scored.
MASK_TOKEN = "[MASK]"


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task. All fields are plain data; see the comment on each field."""

    # Task name used on the command line and in run dirs, e.g. "sst2".
    name: str
    # Input template: "<P>" marks the prompt positions, "{text}" / "{text_b}" the input text(s),
    # "[MASK]" the one position the verbalizer is read at. Exactly BBT's templates.
    template: str
    # One word per label, in label-id order: verbalizer[i] is the word for label id i.
    verbalizer: tuple[str, ...]
    # The Hugging Face hub dataset's label names in label-id order (ClassLabel.names).
    label_names: tuple[str, ...]
    # Loss on the verbalizer logits at [MASK]: "ce" (cross-entropy) or "hinge" (margin 2, BBT's
    # choice for the sentence-pair tasks MRPC, SNLI, RTE).
    loss: Literal["ce", "hinge"]
    # Metric that selects the prompt on dev and is reported on test: "acc" or "f1" (binary F1 of
    # label 1, MRPC only).
    metric: Literal["acc", "f1"]
    # `datasets.load_dataset(hub_path, hub_config, split=...)` arguments for users who are online.
    hub_path: str
    hub_config: str | None
    # Hub column holding the (first) input text.
    hub_text: str
    # Hub column holding the second input text of a pair task; None for single-sentence tasks.
    hub_text_b: str | None
    # Hub split used as the test split (GLUE validation for sst2/mrpc/rte; "test" elsewhere).
    hub_test_split: str
    # Folder name of this task under the data dir (default: cliptune_ort/assets/data).
    local_dir: str
    # How the few-shot train/dev split is made offline: "sample" = BBT's seeded sampler over the full
    # local train split; "predrawn" = the fixed RLPrompt splits in fewshot_rlprompt/<k>-<seed>/;
    # "given" = a task file's own train and dev files, used whole (local_train and local_dev).
    fewshot: Literal["sample", "predrawn", "given"]
    # File (under local_dir) holding the train split sampled from; None for predrawn tasks.
    local_train: str | None
    # How the offline few-shot train/dev examples differ from BBT's (partial train file, predrawn
    # splits); "" when they are BBT's own procedure on the full train split.
    train_note: str
    # File (under local_dir) used as the test split; None where no test split is offline.
    local_test: str | None
    # What the test split is and how it differs from the paper's, one line.
    test_note: str
    # True when examples have a second text (text_b).
    pair: bool
    # Label ids of rows that have no gold label and are dropped on load (SNLI's "-" rows are -1).
    drop_labels: tuple[int, ...] = ()
    # File (under local_dir) holding the dev split, for fewshot "given" only.
    local_dev: str | None = None
    # The task file this spec was read from (absolute path); None for the built-in tasks.
    source_file: str | None = None
    # Names of a local data row's text, second text and label fields (a task file's "columns").
    columns: tuple[str, str, str] = ("text", "text_b", "label")

    def __post_init__(self) -> None:
        """Check the spec is self-consistent (a programming error in the table if not)."""
        n = len(self.label_names)
        if len(self.verbalizer) != n or n < 2:
            raise TaskError(
                f"task {self.name!r}: expected one verbalizer word per label (>= 2), found "
                f"{len(self.verbalizer)} words for {n} labels; fix the entry in cliptune_ort/tasks.py"
            )
        for part in (PROMPT_TOKEN, MASK_TOKEN, "{text}"):
            if self.template.count(part) != 1:
                raise TaskError(
                    f"task {self.name!r}: template {self.template!r} must contain {part!r} exactly once; "
                    "fix the entry in cliptune_ort/tasks.py"
                )
        if ("{text_b}" in self.template) != self.pair or (self.hub_text_b is not None) != self.pair:
            raise TaskError(
                f"task {self.name!r}: pair={self.pair} disagrees with its template / hub_text_b; "
                "fix the entry in cliptune_ort/tasks.py"
            )
        if (self.fewshot != "predrawn") != (self.local_train is not None) or \
                (self.fewshot == "given") != (self.local_dev is not None):
            raise TaskError(
                f"task {self.name!r}: fewshot={self.fewshot!r} needs local_train set exactly when sampling or "
                "given, and local_dev exactly when given; fix the entry in cliptune_ort/tasks.py"
            )

    @property
    def n_labels(self) -> int:
        """Number of classes (= len(label_names) = len(verbalizer))."""
        return len(self.label_names)


_SENTIMENT_TEMPLATE = "<P> . {text} . It was [MASK] ."
_PAIR_TEMPLATE = "<P> . {text} ? [MASK] , {text_b}"
_PREDRAWN_NOTE = (
    "fixed 16-shot train/dev splits drawn by RLPrompt (LM-BFF style) from the full train set, not by BBT's "
    "sampler (the full train split is not offline); seeds 13, 21, 42, 87, 100"
)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="sst2",
            template=_SENTIMENT_TEMPLATE,
            verbalizer=("bad", "great"),
            label_names=("negative", "positive"),
            loss="ce",
            metric="acc",
            hub_path="glue",
            hub_config="sst2",
            hub_text="sentence",
            hub_text_b=None,
            hub_test_split="validation",
            local_dir="sst2",
            fewshot="sample",
            local_train="train.jsonl.gz",
            train_note="",
            local_test="validation.jsonl",
            test_note="GLUE validation (872 rows), BBT's test split for SST-2 (GLUE test labels are hidden)",
            pair=False,
        ),
        TaskSpec(
            name="yelp_polarity",
            template=_SENTIMENT_TEMPLATE,
            verbalizer=("bad", "great"),
            label_names=("1", "2"),
            loss="ce",
            metric="acc",
            hub_path="yelp_polarity",
            hub_config=None,
            hub_text="text",
            hub_text_b=None,
            hub_test_split="test",
            local_dir="yelp_polarity",
            fewshot="predrawn",
            local_train=None,
            train_note=_PREDRAWN_NOTE,
            local_test=None,
            test_note=(
                "no test split offline (the 38,000-row Yelp P. test set is not in the data folder); "
                "use source='hub' to test on it"
            ),
            pair=False,
        ),
        TaskSpec(
            name="ag_news",
            template="<P> . [MASK] News: {text}",
            verbalizer=("World", "Sports", "Business", "Tech"),
            label_names=("World", "Sports", "Business", "Sci/Tech"),
            loss="ce",
            metric="acc",
            hub_path="ag_news",
            hub_config=None,
            hub_text="text",
            hub_text_b=None,
            hub_test_split="test",
            local_dir="ag_news",
            fewshot="predrawn",
            local_train=None,
            train_note=_PREDRAWN_NOTE,
            local_test="test.jsonl",
            test_note="full AG News test split (7,600 rows), as in BBT",
            pair=False,
        ),
        TaskSpec(
            name="dbpedia",
            template="<P> [ Category: [MASK] ] {text}",
            verbalizer=(
                "Company", "Education", "Artist", "Athlete", "Office", "Transportation", "Building",
                "Natural", "Village", "Animal", "Plant", "Album", "Film", "Written",
            ),
            label_names=(
                "Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal", "Plant",
                "Album", "Film", "WrittenWork",
            ),
            loss="ce",
            metric="acc",
            hub_path="dbpedia_14",
            hub_config=None,
            hub_text="content",
            hub_text_b=None,
            hub_test_split="test",
            local_dir="dbpedia",
            fewshot="predrawn",
            local_train=None,
            train_note=_PREDRAWN_NOTE,
            local_test="test.jsonl",
            test_note=(
                "random 7,600-row sample of the 70,000-row DBpedia-14 test split (O-LoRA copy), not the "
                "full test set BBT reports on; use source='hub' for the full test split"
            ),
            pair=False,
        ),
        TaskSpec(
            name="mrpc",
            template=_PAIR_TEMPLATE,
            verbalizer=("No", "Yes"),
            label_names=("not_equivalent", "equivalent"),
            loss="hinge",
            metric="f1",
            hub_path="glue",
            hub_config="mrpc",
            hub_text="sentence1",
            hub_text_b="sentence2",
            hub_test_split="validation",
            local_dir="mrpc",
            fewshot="sample",
            local_train="train.jsonl",
            train_note="",
            local_test="validation.jsonl",
            test_note="GLUE validation (408 rows), BBT's test split for MRPC",
            pair=True,
        ),
        TaskSpec(
            name="rte",
            template=_PAIR_TEMPLATE,
            verbalizer=("Yes", "No"),
            label_names=("entailment", "not_entailment"),
            loss="hinge",
            metric="acc",
            hub_path="glue",
            hub_config="rte",
            hub_text="sentence1",
            hub_text_b="sentence2",
            hub_test_split="validation",
            local_dir="rte",
            fewshot="sample",
            local_train="train.jsonl",
            train_note="",
            local_test="validation.jsonl",
            test_note="GLUE validation (277 rows), BBT's test split for RTE",
            pair=True,
        ),
        TaskSpec(
            name="snli",
            template=_PAIR_TEMPLATE,
            verbalizer=("Yes", "Maybe", "No"),
            label_names=("entailment", "neutral", "contradiction"),
            loss="hinge",
            metric="acc",
            hub_path="snli",
            hub_config=None,
            hub_text="premise",
            hub_text_b="hypothesis",
            hub_test_split="test",
            local_dir="snli",
            fewshot="sample",
            local_train="train_first100k.jsonl.gz",
            train_note=(
                "sampled from the first 100,000 lines of SNLI train (not the full 550,152), so BBT's "
                "exact few-shot samples are not reproduced; use source='hub' for the full train split"
            ),
            local_test="test.jsonl",
            test_note="full SNLI test split without the '-' rows (9,824 rows), as in BBT",
            pair=True,
            drop_labels=(-1,),
        ),
    )
}


def is_task_file(name: object) -> bool:
    """True when ``name`` names a task file (a path ending in ``.json``) rather than a built-in task."""
    return isinstance(name, str) and name.lower().endswith(".json")


def get_task(name: str) -> TaskSpec:
    """Return the :class:`TaskSpec` called ``name``, or read from the task file ``name`` (``*.json``, see
    :func:`load_task_file`); raise :class:`TaskError` for an unknown name or a bad task file."""
    if is_task_file(name):
        return load_task_file(name)
    spec = TASKS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise TaskError(
            f"unknown task {name!r}: expected one of {', '.join(sorted(TASKS))}, or the path of a task file "
            "(*.json, see the README's 'Your own task'); pass --task with one of these"
        )
    return spec


# --------------------------------------------------------------------------------------------- task files

#: Keys of a task file: the required ones, then the optional ones with their defaults.
TASK_FILE_REQUIRED = ("template", "verbalizer", "train")
TASK_FILE_OPTIONAL: dict[str, Any] = {
    "name": None,  # default: the file's name without .json
    "label_names": None,  # default: the verbalizer words
    "dev": None,  # a dev file used whole; without it train and dev are sampled from train (BBT's sampler)
    "test": None,
    "loss": "ce",
    "metric": "acc",
    "hub_path": None, "hub_config": None, "hub_text": "text", "hub_text_b": None, "hub_test_split": "test",
    "columns": None,  # {"text": ..., "text_b": ..., "label": ...}: the data files' own field names
    "description": "",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def task_file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a task file's bytes (a resume of a run on a task file refuses a changed file)."""
    if not Path(path).is_file():
        raise TaskError(f"task file {path} not found; pass --task with the path of an existing task file")
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise TaskError(f"task file {path}: cannot be read ({e.strerror or e}); pass --task with the path of an "
                        "existing task file") from None


def load_task_file(path: str | os.PathLike[str]) -> TaskSpec:
    """Read a task file: your own classification task as data.

    A task file is a JSON object. Required: ``template`` (``<P>``, ``{text}``, optionally ``{text_b}`` for a
    sentence-pair task, and one ``[MASK]``), ``verbalizer`` (one word per label, in label-id order) and ``train``
    (JSON Lines ``{"text": ..., "label": ...}`` rows, ``text_b`` too for pairs, or CSV / TSV with a header row,
    optionally gzipped; labels are label names or ids). Optional: ``name`` (default: the file's stem),
    ``label_names`` (default: the verbalizer), ``dev`` (a dev file used whole; without it the few-shot train and
    dev sets are drawn from ``train`` by BBT's seeded sampler, ``per_class`` of each label each), ``test``,
    ``loss`` ("ce" or "hinge"), ``metric`` ("acc" or "f1": binary F1 of label 1), ``columns`` (the data files'
    own names for text, text_b and label), ``hub_*`` (a Hugging Face dataset for ``--data-source hub``) and
    ``description``. File paths are relative to the task file's folder.

    Raises:
        TaskError: one line naming the file and the key: unreadable file or JSON, unknown or missing key, a
            value of the wrong type, a template or verbalizer that does not fit.
    """
    p = Path(path).expanduser()
    where = f"task file {p}"
    if not p.is_file():
        raise TaskError(f"{where} not found: expected a JSON task file there (see the README's 'Your own task'); "
                        "pass --task with its path, or a built-in task name")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{where}: cannot be read as UTF-8 text ({e}); fix the file") from None
    except json.JSONDecodeError as e:
        raise TaskError(f"{where}: expected a JSON object, found invalid JSON ({e.msg} at line {e.lineno}, column "
                        f"{e.colno}); fix the file") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: expected a JSON object, found a JSON {type(raw).__name__}; write "
                        '{"template": ..., "verbalizer": [...], "train": ...}')
    unknown = sorted(set(raw) - set(TASK_FILE_REQUIRED) - set(TASK_FILE_OPTIONAL))
    if unknown:
        raise TaskError(f"{where}: unknown key(s) {unknown}; expected keys from "
                        f"{list(TASK_FILE_REQUIRED) + list(TASK_FILE_OPTIONAL)}")
    missing = [k for k in TASK_FILE_REQUIRED if k not in raw]
    if missing:
        raise TaskError(f"{where}: missing key(s) {missing}; a task file needs a template, a verbalizer (one word "
                        "per label) and a train file")
    v = {**TASK_FILE_OPTIONAL, **raw}

    def text(key: str, optional: bool = False) -> str | None:
        val = v[key]
        if optional and val is None:
            return None
        if not isinstance(val, str) or (not val.strip() and key != "description"):
            raise TaskError(f"{where}: {key!r} must be a non-empty string{' or null' if optional else ''}, found "
                            f"{val!r:.60}")
        return val

    def words(key: str) -> tuple[str, ...]:
        val = v[key]
        if not isinstance(val, list) or not all(isinstance(w, str) and w.strip() for w in val):
            raise TaskError(f"{where}: {key!r} must be a list of non-empty strings (one per label, in label-id "
                            f"order), found {val!r:.80}")
        if len(set(val)) != len(val):
            raise TaskError(f"{where}: {key!r} has repeated entries {val!r:.80}; give each label its own")
        return tuple(val)

    text("description")  # free text, but text
    name = text("name", optional=True) or p.name[: -len(".json")]
    if not _NAME_RE.match(name) or name in TASKS:
        raise TaskError(f"{where}: name {name!r} must be 1-64 letters, digits, '_', '-' or '.' and not a built-in "
                        f"task's ({', '.join(sorted(TASKS))}); set \"name\" in the file")
    verbalizer = words("verbalizer")
    label_names = words("label_names") if v["label_names"] is not None else verbalizer
    for key, options in (("loss", ("ce", "hinge")), ("metric", ("acc", "f1"))):
        if v[key] not in options:
            raise TaskError(f"{where}: {key!r} must be one of {', '.join(options)}, found {v[key]!r:.40}")
    if v["metric"] == "f1" and len(label_names) != 2:
        raise TaskError(f"{where}: metric 'f1' is binary F1 of label 1, but the task has {len(label_names)} labels; "
                        "use metric 'acc'")
    template = text("template")
    if not template.lstrip().startswith(PROMPT_TOKEN):
        raise TaskError(f"{where}: template {template!r:.80} must start with {PROMPT_TOKEN} (the prompt takes positions "
                        "1..L, right after [CLS]); fix the file")
    pair = "{text_b}" in template
    hub_path = text("hub_path", optional=True)
    hub_text_b = text("hub_text_b", optional=True)
    if hub_path is not None and pair != (hub_text_b is not None):
        raise TaskError(f"{where}: a pair task's template ({{text_b}}) needs 'hub_text_b' with 'hub_path', and a "
                        "single-text task none; fix the file")
    cols = v["columns"] if v["columns"] is not None else {}
    if not isinstance(cols, dict) or set(cols) - {"text", "text_b", "label"} or \
            not all(isinstance(c, str) and c.strip() for c in cols.values()):
        raise TaskError(f"{where}: 'columns' must map some of text, text_b, label to the data files' field names, "
                        f"found {cols!r:.80}; e.g. {{\"text\": \"review\", \"label\": \"stars\"}}")
    columns = (cols.get("text", "text"), cols.get("text_b", "text_b"), cols.get("label", "label"))
    files = {key: text(key, optional=key != "train") for key in ("train", "dev", "test")}
    folder = p.resolve().parent
    rel = {key: None if f is None else os.path.relpath((folder / Path(f).expanduser()).resolve(), folder)
           for key, f in files.items()}
    try:
        return TaskSpec(
            name=name, template=template, verbalizer=verbalizer, label_names=label_names, loss=v["loss"],
            metric=v["metric"], hub_path=hub_path or "", hub_config=text("hub_config", optional=True),
            hub_text=text("hub_text"), hub_text_b=hub_text_b if hub_path is not None else (
                "text_b" if pair else None),
            hub_test_split=text("hub_test_split"), local_dir=str(folder),
            fewshot="given" if rel["dev"] is not None else "sample", local_train=rel["train"],
            train_note=f"task file {p.resolve()}" + (": train and dev files used whole" if rel["dev"] else ""),
            local_test=rel["test"], local_dev=rel["dev"],
            test_note=f"{files['test']} (task file)" if rel["test"] else
            f"no test file in {p.name}; add \"test\" to the task file to report test metrics",
            pair=pair, source_file=str(p.resolve()), columns=columns)
    except TaskError as e:
        raise TaskError(f"{where}: {str(e).split('; fix')[0]}; fix the file") from None
