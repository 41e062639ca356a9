"""The parts of `ueo stream` on their own: the source read as it arrives, the running Otsu
threshold against `ueo.metrics.otsu_threshold`, TDA's caches against a hand computation."""

from __future__ import annotations

import io
import math
import os
import threading

import numpy as np
import pytest
import torch

from ueo.errors import UeoError
from ueo.metrics import otsu_threshold
from ueo.names import OOD, UNLABELED
from ueo.stream.settings import TdaSettings
from ueo.stream.source import Entry, arriving_lines, stream_entries
from ueo.stream.tda import Tda
from ueo.stream.threshold import RunningOtsu

# --- the source ----------------------------------------------------------------------------


def test_a_pipe_is_read_line_by_line_as_it_arrives():
    read, write = os.pipe()
    with open(read, "rb", buffering=0) as r, open(write, "wb", buffering=0) as w:
        lines = arriving_lines(r)
        w.write(b"\xef\xbb\xbffirst.png\r\nsecond")
        assert next(lines) == "first.png"  # the writer is still open: nothing waits for its end
        got = []
        reader = threading.Thread(target=lambda: got.append(next(lines)))
        reader.start()
        reader.join(0.2)
        assert reader.is_alive() and not got  # "second" has no line end yet
        w.write(b".png\n")
        reader.join(5)
        assert got == ["second.png"]
        w.close()
        assert list(lines) == []


def test_standard_input_that_is_not_utf8_is_one_line():
    read, write = os.pipe()
    os.write(write, b"ok.png\n\xff\xfe.png\n")
    os.close(write)
    with open(read, "rb", buffering=0) as r:
        lines = arriving_lines(r)
        assert next(lines) == "ok.png"
        with pytest.raises(UeoError, match="line 2, is not UTF-8"):
            next(lines)


def entries(text: str, **kw) -> list[Entry]:
    return list(stream_entries("-", ["a", "b"], "/r", stdin=io.StringIO(text), **kw))


def test_list_lines_with_and_without_labels_and_domains():
    assert entries("x.png\n# note\n\ny 1.png\n") == [
        Entry("/r/x.png", UNLABELED),
        Entry("/r/y 1.png", UNLABELED),  # an image's name is never a domain
    ]
    assert entries("x.png 0\ny.png 7\n") == [Entry("/r/x.png", 0), Entry("/r/y.png", OOD)]
    assert entries("x.png 1 blur\nmy dir/y.png 0 noise\n") == [
        Entry("/r/x.png", 1, "blur"),
        Entry("/r/my dir/y.png", 0, "noise"),
    ]
    assert entries("x.png - blur\n") == [Entry("/r/x.png", UNLABELED, "blur")]
    assert entries("x.png 1 blur\n", unlabeled=True) == [Entry("/r/x.png", UNLABELED, "blur")]


def test_a_line_of_another_kind_is_one_line():
    with pytest.raises(
        UeoError, match=r"standard input:2: 'y.png' is not .*\('path label domain'\)"
    ):
        entries("x.png 1 blur\ny.png\n")


def test_a_folder_streams_in_sorted_order(tmp_path):
    for name in ("b/2.png", "b/1.png", "a/9.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [e.path for e in stream_entries(tmp_path, ["a", "b"])]
    assert found == [str(tmp_path / n) for n in ("a/9.png", "b/1.png", "b/2.png")]
    listed = tmp_path / "list.txt"
    listed.write_text("b/2.png 1\na/9.png 0\n")
    assert [(e.path, e.label) for e in stream_entries(listed, ["a", "b"])] == [
        (str(tmp_path / "b/2.png"), 1),
        (str(tmp_path / "a/9.png"), 0),
    ]


# --- the threshold -------------------------------------------------------------------------


def narrow_scores(rng, n: int) -> np.ndarray:
    """MCM-like scores: two modes in a band 0.03 wide just above 1/10, as on the testbed."""
    known = rng.random(n) < 0.7
    return np.where(known, 0.118 + 0.004 * rng.standard_normal(n), 0.106 + 0.003 * rng.random(n))


def test_running_otsu_is_otsu_over_every_score_so_far():
    rng = np.random.default_rng(0)
    otsu = RunningOtsu()
    seen, equal, steps = [], 0, 0
    for size in rng.integers(1, 40, 120):
        batch = narrow_scores(rng, size)
        seen.append(batch)
        everything = np.concatenate(seen)
        got, want = otsu.add(batch), otsu_threshold(everything)
        width = (everything.max() - everything.min()) / 256
        assert abs(got - want) <= width + 1e-15  # at most one bin apart
        equal += got == want
        steps += 1
    assert equal >= steps - 2, (equal, steps)  # 23998 of 24000 on 200 such streams


def test_running_otsu_is_exact_while_the_range_holds():
    """The first batch holds the extremes: every later batch is added to the same 256 bins
    as np.histogram would put it in, so the threshold is otsu_threshold's, bit for bit."""
    rng = np.random.default_rng(1)
    otsu = RunningOtsu()
    seen = [np.array([0.1, 0.15])]
    otsu.add(seen[0])
    for _ in range(50):
        seen.append(rng.uniform(0.1, 0.15, rng.integers(1, 20)))
        assert otsu.add(seen[-1]) == otsu_threshold(np.concatenate(seen))


def test_running_otsu_edge_cases_and_its_state_round_trip():
    otsu = RunningOtsu()
    assert math.isnan(otsu.threshold)
    assert math.isnan(otsu.add(np.array([])))  # nothing seen
    assert otsu.add(np.array([0.3, 0.3])) == 0.3 == otsu_threshold(np.array([0.3, 0.3]))
    rng = np.random.default_rng(2)
    otsu.add(narrow_scores(rng, 100))
    copy = RunningOtsu()
    copy.load(*otsu.state())
    batch = narrow_scores(rng, 7)
    assert copy.add(batch) == otsu.add(batch)
    with pytest.raises(ValueError, match="not finite"):
        otsu.add(np.array([np.nan]))


# --- TDA ---------------------------------------------------------------------------------


def test_tda_caches_against_a_hand_computation():
    """Three classes, 2-D features. The logits 100 cos are chosen so that each image's
    entropy is known: [5, 0, 0] has p = (e^5, 1, 1) / (e^5 + 2)."""
    s = TdaSettings(pos_capacity=2, neg_capacity=1, neg_entropy=(0.2, 0.5), neg_mask=(0.03, 1.0))
    tda = Tda(s, classes=3, dim=2, device=torch.device("cpu"))
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    logits = torch.tensor([[5.0, 0.0, 0.0], [8.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1.5, 0.0]])

    def entropy(row):
        p = np.exp(row) / np.exp(row).sum()
        return -(p * np.log(p)).sum(), p

    h = [entropy(np.array(r, dtype=np.float64)) for r in logits.tolist()]
    # normalised entropies (nats by log2 3, as in TDA's code)
    assert [round(x / math.log2(3), 3) for x, _ in h] == [0.05, 0.004, 0.42, 0.601]
    assert tda.logits(f) is None  # empty caches add nothing

    tda.update(f, logits / 100)
    # positive: class 0 holds images 1 then 0 (lowest entropy first; 2 is beyond capacity 2
    # and not lower than the highest kept); class 1 holds image 3.
    assert tda.positive.count.tolist() == [2, 1, 0]
    assert torch.equal(tda.positive.keys[0], f[[1, 0]])
    assert torch.equal(tda.positive.keys[1, 0], f[3])
    # negative: only image 2's normalised entropy lies in (0.2, 0.5); its mask keeps the
    # classes of probability in (0.03, 1): p = (0.787, 0.107, 0.107), all three.
    assert tda.negative.count.tolist() == [1, 0, 0]
    assert torch.equal(tda.negative.masks[0, 0], torch.tensor([1.0, 1.0, 1.0]))

    query = torch.tensor([[0.0, 1.0]])
    # affinities to the positive keys: image 1: 0.8, image 0: 0.0, image 3: 0.6
    pos = 2.0 * np.array([math.exp(-5 * 0.2) + math.exp(-5 * 1.0), math.exp(-5 * 0.4), 0.0])
    neg = 0.117 * math.exp(-1.0 * (1 - 1.0)) * np.ones(3)  # image 2's key is the query itself
    assert tda.logits(query)[0].numpy() == pytest.approx(pos - neg, rel=1e-6)

    # A lower-entropy image of class 0 replaces the highest of the full class, then sorts.
    tda.update(torch.tensor([[0.0, -1.0]]), torch.tensor([[0.07, 0.0, 0.0]]))
    assert torch.equal(tda.positive.keys[0], torch.tensor([[0.6, 0.8], [0.0, -1.0]]))
    tda.reset()
    assert tda.logits(query) is None
