"""Template rendering, truncation, length buckets."""

from __future__ import annotations

import numpy as np
import pytest

from cliptune_ort.data import Example
from cliptune_ort.encoding import PromptTokenizer, buckets, padded_fraction
from cliptune_ort.errors import TaskError
from cliptune_ort.tasks import TASKS

from .conftest import SPLADE

INFO = {"cls_id": 101, "sep_id": 102, "mask_id": 103, "pad_id": 0}


@pytest.fixture(scope="module")
def ptok():
    return PromptTokenizer(SPLADE / "tokenizer.json", INFO, 50, list(range(1000, 1050)), 512)


def test_sst2_rendering(ptok):
    ids, mp, trunc = ptok.render(TASKS["sst2"].template, Example("a great movie", 1))
    assert ids[0] == 101 and ids[-1] == 102 and ids[1:51] == list(range(1000, 1050))
    assert ids.count(103) == 1 and ids[mp] == 103 and not trunc
    words = ptok.tok.decode(ids[51:], skip_special_tokens=False)
    assert words == ". a great movie. it was [MASK]. [SEP]"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_template_truncates_text_only(task, ptok):
    spec = TASKS[task]
    small = PromptTokenizer(SPLADE / "tokenizer.json", INFO, 50, list(range(1000, 1050)), 96)
    long = " ".join(["word"] * 400)
    ex = Example(long, 0, long if spec.pair else None)
    ids, mp, trunc = small.render(spec.template, ex)
    assert trunc and len(ids) == 96
    assert ids[1:51] == list(range(1000, 1050))
    assert ids.count(103) == 1 and ids[mp] == 103 and ids[-1] == 102
    short = Example("fine", 0, "ok" if spec.pair else None)
    ids2, mp2, t2 = small.render(spec.template, short)
    assert not t2 and ids2.count(103) == 1


def test_verbalizer_ids_and_multi_token_error(ptok):
    assert ptok.verbalizer_ids(("bad", "great")).tolist() == [2919, 2307]
    with pytest.raises(TaskError, match="expected exactly 1"):
        ptok.verbalizer_ids(("bad", "unbelievableness"))
    assert len(ptok.verbalizer_ids(("bad", "unbelievableness"), policy="first")) == 2


def test_manual_rendering_has_no_placeholders_but_min_length(ptok):
    enc = ptok.encode(TASKS["sst2"].template, [Example("ok", 0)], use_prompt=False)
    assert 1000 not in enc.ids[0].tolist()
    assert enc.ids.shape[1] >= 51  # the graph adds the (zero) prompt at positions 1..L


def test_buckets_cover_rows_and_cut_padding(ptok):
    exs = [Example(" ".join(["w"] * n), n % 2) for n in (1, 30, 2, 25, 3, 40, 4, 5)]
    enc = ptok.encode(TASKS["sst2"].template, exs)
    one = buckets(enc, 1)
    four = buckets(enc, 4)
    assert sorted(np.concatenate([i for i, _ in four]).tolist()) == list(range(8))
    assert padded_fraction(four) < padded_fraction(one)
    for idx, sub in four:
        np.testing.assert_array_equal(sub.mask_pos, enc.mask_pos[idx])
        for r, i in enumerate(idx):
            n = enc.lengths[i]
            np.testing.assert_array_equal(sub.ids[r, :n], enc.ids[i, :n])


def test_longest_first_matches_token_by_token_truncation():
    from cliptune_ort.encoding import longest_first

    def slow(lens, room):
        lens = list(lens)
        while sum(lens) > room:
            lens[int(np.argmax(lens))] -= 1
        return lens

    for a in range(15):
        for room in range(1, 30):
            assert longest_first([a], room) == slow([a], room)
            for b in range(15):
                assert longest_first([a, b], room) == slow([a, b], room), (a, b, room)
