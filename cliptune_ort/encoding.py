"""Template rendering and tokenisation: examples -> fixed, right-padded id batches.

A rendered example is ``[CLS] <P_1..P_L> <template with the text and one [MASK]> [SEP]``. Literal
template pieces and the texts are tokenised separately and concatenated, so the [MASK] and the
prompt positions are never split or moved. When an example is longer than ``max_len`` only the
text parts are cut (longest first for pairs), never the prompt, the template or the mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Example
from .errors import ModelDirError, TaskError

_SLOT = re.compile(r"(<P>|\{text\}|\{text_b\}|\[MASK\])")


@dataclass
class Encoded:
    """A tokenised set of examples, right-padded to its longest row.

    ids [n, seq] int64, attention_mask [n, seq] int64, mask_pos [n] int64, labels [n] int64,
    lengths [n] (real tokens per row), n_truncated (rows whose text was cut).
    """

    ids: np.ndarray
    attention_mask: np.ndarray
    mask_pos: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    n_truncated: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, index: np.ndarray) -> "Encoded":
        """Rows ``index``, re-padded to their own longest row (no wasted columns)."""
        seq = int(self.lengths[index].max())
        seq = max(seq, self.min_seq)
        return Encoded(self.ids[index, :seq].copy(), self.attention_mask[index, :seq].copy(),
                       self.mask_pos[index].copy(), self.labels[index].copy(), self.lengths[index].copy(),
                       0)

    min_seq: int = 1


def longest_first(lens: list[int], room: int) -> list[int]:
    """HF's longest_first truncation in closed form: cut the longest text until the total fits.

    Equivalent to removing one token at a time from the currently longest text (ties: the first),
    without the per-token loop (a 1 MB text would otherwise take ~10^5 iterations).
    """
    if sum(lens) <= room:
        return list(lens)
    if len(lens) == 1:
        return [room]
    a, b = lens
    # one text is cut down to the other's length first, then both shrink together (at equal lengths
    # argmax picks the first, so the second keeps the odd token)
    if abs(a - b) >= sum(lens) - room:
        cut = sum(lens) - room
        return [a - cut, b] if a >= b else [a, b - cut]
    return [room // 2, (room + 1) // 2]


def clean_text(text: str | None) -> str | None:
    """BBT's per-task clean-ups, harmless everywhere: literal backslash-n pairs (Yelp) become spaces,
    outer whitespace (DBPedia's leading space, SST-2's trailing space) is stripped."""
    if text is None:
        return None
    return text.replace("\\n", " ").strip()


class PromptTokenizer:
    """Renders task templates with a model directory's tokenizer and prompt placeholders."""

    def __init__(self, tokenizer_path: str | Path, info: dict, n_prompt: int, placeholder_ids: list[int],
                 max_len: int):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ModelDirError(f"cannot read tokenizer {tokenizer_path} ({e}): re-export the model dir") from None
        self.tok.no_padding()
        self.tok.no_truncation()
        self.cls_id = int(info["cls_id"])
        self.sep_id = int(info["sep_id"])
        self.mask_id = int(info["mask_id"])
        self.pad_id = int(info["pad_id"])
        self.n_prompt = int(n_prompt)
        self.placeholder_ids = [int(i) for i in placeholder_ids]
        self.max_len = int(max_len)
        self._piece_cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _piece(self, text: str) -> list[int]:
        if text not in self._piece_cache:
            self._piece_cache[text] = self._ids(text) if text.strip() else []
        return self._piece_cache[text]

    def verbalizer_ids(self, words: tuple[str, ...] | list[str], policy: str = "error") -> np.ndarray:
        """Vocabulary ids [labels] of the verbalizer words (no leading space, as BBT).

        policy 'error' refuses a word that is not one token; 'first' keeps its first sub-token (BBT).
        """
        out = []
        for w in words:
            ids = self._ids(w)
            if len(ids) != 1:
                if policy == "first" and ids:
                    ids = ids[:1]
                else:
                    pieces = self.tok.encode(w, add_special_tokens=False).tokens
                    raise TaskError(f"verbalizer word {w!r} is {len(pieces)} tokens {pieces} for this tokenizer, "
                                    "expected exactly 1: choose a one-token word or pass --verbalizer-policy first")
            out.append(ids[0])
        if len(set(out)) != len(out):
            raise TaskError(f"verbalizer words {list(words)} map to repeated token ids {out}: choose distinct words")
        return np.asarray(out, dtype=np.int64)

    def render(self, template: str, ex: Example, use_prompt: bool = True) -> tuple[list[int], int, bool]:
        """Token ids of one example, the mask position, and whether the text was truncated."""
        parts = [p for p in _SLOT.split(template) if p != ""]
        if parts.count("[MASK]") != 1:
            raise TaskError(f"template {template!r} must contain [MASK] exactly once")
        if "<P>" in parts and parts[0] != "<P>":
            raise TaskError(f"template {template!r} must start with <P> (prompt positions 1..L)")
        texts = {"{text}": clean_text(ex.text), "{text_b}": clean_text(ex.text_b)}
        fixed = 2  # [CLS] [SEP]
        segs: list[tuple[str, list[int]]] = []
        for i, part in enumerate(parts):
            if part == "<P>":
                ids = list(self.placeholder_ids) if use_prompt else []
                segs.append(("fixed", ids))
            elif part == "[MASK]":
                segs.append(("mask", [self.mask_id]))
            elif part in texts:
                if texts[part] is None:
                    raise TaskError(f"template {template!r} uses {part} but the example has none")
                prev = parts[i - 1] if i > 0 else ""
                lead = " " if prev.endswith(" ") else ""
                segs.append((part, self._ids(lead + texts[part])))
            else:
                segs.append(("fixed", self._piece(part.strip())))
        fixed += sum(len(ids) for kind, ids in segs if kind in ("fixed", "mask"))
        room = self.max_len - fixed
        if room < 1:
            raise TaskError(f"template and prompt take {fixed} tokens, more than max_len {self.max_len}: "
                            "shorten the template or lower --n-prompt")
        text_idx = [j for j, (kind, _) in enumerate(segs) if kind.startswith("{")]
        lens = [len(segs[j][1]) for j in text_idx]
        truncated = sum(lens) > room
        if truncated:
            lens = longest_first(lens, room)
        ids = [self.cls_id]
        mask_pos = -1
        for j, (kind, seg) in enumerate(segs):
            if kind.startswith("{"):
                seg = seg[: lens[text_idx.index(j)]]
            if kind == "mask":
                mask_pos = len(ids)
            ids.extend(seg)
        ids.append(self.sep_id)
        return ids, mask_pos, truncated

    def encode(self, template: str, examples: list[Example], use_prompt: bool = True) -> Encoded:
        """Render and right-pad ``examples``; rows are at least L+1 long (the graph adds the prompt there)."""
        rows, pos, trunc = [], [], 0
        for ex in examples:
            ids, mp, t = self.render(template, ex, use_prompt)
            rows.append(ids)
            pos.append(mp)
            trunc += int(t)
        n = len(rows)
        min_seq = self.n_prompt + 1
        seq = max(max((len(r) for r in rows), default=0), min_seq)
        ids = np.full((n, seq), self.pad_id, dtype=np.int64)
        am = np.zeros((n, seq), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            am[i, : len(r)] = 1
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        labels = np.array([ex.label for ex in examples], dtype=np.int64)
        enc = Encoded(ids, am, np.asarray(pos, dtype=np.int64), labels, lengths, trunc)
        enc.min_seq = min_seq
        return enc


def buckets(enc: Encoded, n_buckets: int) -> list[tuple[np.ndarray, Encoded]]:
    """Split rows into ``n_buckets`` length buckets (sorted by length, each padded to its own longest).

    Returns [(row index into ``enc``, sub-batch)]. Padded positions are then computed once per
    bucket instead of once per row of the whole batch. n_buckets=1 keeps one batch (BBT's way).
    """
    n = len(enc)
    n_buckets = max(1, min(int(n_buckets), n))
    order = np.argsort(enc.lengths, kind="stable")
    out = []
    for part in np.array_split(order, n_buckets):
        if len(part):
            idx = np.sort(part) if n_buckets == 1 else part
            sub = enc.take(idx)
            sub.min_seq = enc.min_seq
            out.append((idx, sub))
    return out


def padded_fraction(parts: list[tuple[np.ndarray, Encoded]]) -> float:
    """Share of computed token positions that are padding."""
    total = sum(sub.ids.size for _, sub in parts)
    real = sum(int(sub.lengths.sum()) for _, sub in parts)
    return 1.0 - real / total if total else 0.0
