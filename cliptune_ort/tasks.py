"""The task table: the seven Clip-Tuning / BBT benchmarks as data.

Tasks are data, not classes: one frozen :class:`TaskSpec` per task in :data:`TASKS`, looked up with
:func:`get_task`. A spec says how an example becomes a prompt (``template``, ``verbalizer``), how a
candidate is scored (``loss``, ``metric``), where the data comes from (the vendored offline copy under
``cliptune_ort/assets/data/<local_dir>`` or the Hugging Face hub) and how the few-shot split is made.

Templates and verbalizers are BBT's (Sun et al., 2022), see DESIGN.md. Label ids follow the Hugging Face
``datasets`` conventions (the vendored data uses the same ids; each task's README in the data folder states
the mapping), and ``verbalizer[i]`` / ``label_names[i]`` belong to label id ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    # local train split; "predrawn" = the fixed RLPrompt splits in fewshot_rlprompt/<k>-<seed>/.
    fewshot: Literal["sample", "predrawn"]
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
        if (self.fewshot == "sample") != (self.local_train is not None):
            raise TaskError(
                f"task {self.name!r}: fewshot={self.fewshot!r} needs local_train set exactly when "
                "sampling; fix the entry in cliptune_ort/tasks.py"
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


def get_task(name: str) -> TaskSpec:
    """Return the :class:`TaskSpec` called ``name``; raise :class:`TaskError` for an unknown name."""
    spec = TASKS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise TaskError(
            f"unknown task {name!r}: expected one of {', '.join(sorted(TASKS))}; "
            "pass --task with one of these"
        )
    return spec
