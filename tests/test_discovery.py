"""`ueo discover`: grouping and naming the rejected images, the vocabulary, the command.

The grouping is tested on synthetic features whose groups are known; the vocabulary on small
files in WordNet's format written here (the tests never need the wordnet-base package); the
command end to end on the bundled tiny model.
"""

import codecs
import csv
import itertools
import json
import logging

import numpy as np
import pytest
import torch
from conftest import CLASSES, load_calibrated, make_folder, untrained_run
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import ueo.discovery.vocabulary
from ueo.cli import build_parser, main
from ueo.data import ImageSet, load_image_set
from ueo.discovery.files import discovery_table
from ueo.discovery.groups import (
    assign_names,
    cluster_accuracy,
    discover_outputs,
    evaluate_discovery,
    evaluate_per_image,
    grouping_scores,
)
from ueo.discovery.settings import DEFAULT_MAX_CLUSTERS, DiscoverSettings
from ueo.discovery.vocabulary import (
    Vocabulary,
    encode_names,
    encode_vocabulary,
    fitting_names,
    load_vocabulary,
    read_wordnet,
    without_known,
)
from ueo.errors import UeoError
from ueo.inference import Outputs, infer
from ueo.recipe import Runtime

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Model .* has RANDOM weights"),
]

QUIET = Runtime(device="cpu", workers=0, progress=False)
WORDNET_HEADER = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  By obtaining, using  \n"
    "  3   \n"
)


# Synthetic groups: `n` images around each of `k` orthogonal directions.


def grouped_features(k: int, n: int, dim: int = 32, noise: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:k]
    truth = np.repeat(np.arange(k), n)
    x = centers[truth] + noise * rng.normal(size=(k * n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def outputs_of(features: np.ndarray, known_text: np.ndarray) -> Outputs:
    cos = features @ known_text.T
    return Outputs(cos.astype(np.float32), np.ones(len(features), bool), features)


def image_set(n: int) -> ImageSet:
    return ImageSet([f"img{i}.png" for i in range(n)], np.full(n, -2))


def vocabulary_for(directions: np.ndarray, names: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """Vocabulary features pointing at the given directions: name i names direction i."""
    return tuple(names), directions.astype(np.float32)


def known_text(dim: int = 32, first: int = 20, count: int = 3) -> np.ndarray:
    """Known-class text features on directions no synthetic group uses."""
    return np.eye(dim, dtype=np.float32)[first : first + count]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_separable_groups_give_the_right_k_and_a_perfect_assignment(k):
    feats, truth = grouped_features(k, 12)
    names, vocab = vocabulary_for(np.eye(32)[:k], [f"thing{i}" for i in range(k)])
    found = discover_outputs(
        outputs_of(feats, known_text()), image_set(len(feats)), 1.0, known_text(),
        ["a", "b", "c"], names, vocab,
    )  # fmt: skip
    assert found.k == k and found.selection["rule"] == "silhouette"
    assert found.selection["k"] == k
    assert cluster_accuracy(truth, found.cluster) == 1.0
    # Every group is named after its own direction, all images voting for it.
    for c in found.clusters:
        members = truth[found.cluster == c.id]
        assert c.name == f"thing{members[0]}" and c.top_names[0] == (c.name, 1.0)
        assert c.size == 12 and 0.9 < c.tightness < 1 and not c.likely_known
    assert (found.distance >= -1e-6).all() and (found.distance < 0.15).all()


def test_gcd_rule_finds_the_new_groups_beside_confident_known_images():
    """GCD's rule: the confident known images (accepted, labelled by their prediction) and the
    rejected ones clustered together; the fewest new groups that keep the known classes apart
    win. The known classes here are nearer each other than the new groups are, so too few
    clusters merge two known classes first."""
    new, new_truth = grouped_features(3, 10, seed=1)
    directions = 0.6 * np.eye(32)[20:23] + 0.8 * np.eye(32)[31]  # pairwise cosine 0.64
    texts = directions.astype(np.float32)
    rng = np.random.default_rng(2)
    old_truth = np.repeat(np.arange(3), 10)
    old = directions[old_truth] + 0.02 * rng.normal(size=(30, 32))
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    feats = np.concatenate([old, new]).astype(np.float32)
    # Cosines chosen so that MCM is ~1 for the known images and 1/3 for the new ones.
    cos = np.concatenate([20 * old @ texts.T, np.zeros((30, 3))]).astype(np.float32)
    out = Outputs(cos, np.ones(60, bool), feats)
    names, vocab = vocabulary_for(np.eye(32)[:3], ["x", "y", "z"])
    found = discover_outputs(
        out, image_set(60), 0.5, texts, ["a", "b", "c"], names, vocab,
        DiscoverSettings(k_select="gcd", max_clusters=6),
    )  # fmt: skip
    assert found.counts["rejected"] == 30 and list(found.rows) == list(range(30, 60))
    assert list(out.pred[:30]) == old_truth.tolist()
    assert found.selection["rule"] == "gcd" and found.selection["k"] == 3
    assert found.selection["labelled"] == 30 and found.selection["labelled_classes"] == 3
    scores = [e["score"] for e in found.selection["scores"]]
    assert scores[0] < 1.0 and scores[1] < 1.0 and scores[2] == 1.0
    assert cluster_accuracy(new_truth, found.cluster) == 1.0


def test_a_fixed_number_of_clusters_is_used_as_given():
    feats, truth = grouped_features(4, 6)
    names, vocab = vocabulary_for(np.eye(32)[:4], list("abcd"))
    found = discover_outputs(
        outputs_of(feats, known_text()), image_set(24), 1.0, known_text(), ["k1", "k2", "k3"],
        names, vocab, DiscoverSettings(clusters=2),
    )  # fmt: skip
    assert found.k == 2 and found.selection == {"rule": "fixed", "scores": [], "k": 2}


def test_a_cluster_nearer_a_known_class_is_reported_as_likely_known():
    feats, _ = grouped_features(2, 8)
    texts = np.eye(32, dtype=np.float32)[[0, 20]]  # known class "cat" is direction 0
    names, vocab = vocabulary_for(0.8 * np.eye(32)[:2] + 0.6 * np.eye(32)[[5, 6]], ["u", "v"])
    out = Outputs(np.zeros((16, 2), np.float32), np.ones(16, bool), feats)
    found = discover_outputs(out, image_set(16), 1.0, texts, ["cat", "dog"], names, vocab)
    flagged, other = sorted(found.clusters, key=lambda c: not c.likely_known)
    assert flagged.likely_known and not other.likely_known
    assert (flagged.nearest_known, flagged.known_share) == ("cat", 1.0)
    assert flagged.known_cos > 0.99 and other.known_cos < 0.2 and other.known_share == 0.0


@pytest.mark.parametrize("own, likely", [([4, 2, 2, 2], True), ([4, 4, 1, 1], False)])
def test_likely_known_is_a_plurality_of_votes_over_known_classes_and_vocabulary(own, likely):
    """One group: `own[0]` images nearest the known class "cat", the others nearest three
    vocabulary names. A known class needs more votes than any single name (not a majority:
    a large vocabulary scatters its votes)."""
    rng = np.random.default_rng(0)
    directions = np.repeat(np.eye(32)[:4], own, axis=0) + 0.01 * rng.normal(size=(sum(own), 32))
    feats = (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
    texts = np.eye(32, dtype=np.float32)[[0, 20]]
    names, vocab = vocabulary_for(np.eye(32)[1:4], ["u", "v", "w"])
    out = Outputs(np.zeros((len(feats), 2), np.float32), np.ones(len(feats), bool), feats)
    found = discover_outputs(
        out, image_set(len(feats)), 1.0, texts, ["cat", "dog"], names, vocab,
        DiscoverSettings(clusters=1),
    )  # fmt: skip
    (group,) = found.clusters
    assert group.known_share == pytest.approx(own[0] / sum(own))
    assert group.likely_known is likely and group.name in ("u", "v", "w")


def test_no_rejected_image_is_a_clear_answer():
    feats, _ = grouped_features(2, 3)
    names, vocab = vocabulary_for(np.eye(32)[:2], ["a", "b"])
    found = discover_outputs(
        outputs_of(feats, known_text()), image_set(6), 0.0, known_text(), ["x", "y", "z"],
        names, vocab,
    )  # fmt: skip
    assert found.k == 0 and found.counts["rejected"] == 0 and found.paths == []
    assert "No image was rejected" in discovery_table(found)


def test_one_rejected_image_is_one_group():
    feats, _ = grouped_features(1, 1)
    names, vocab = vocabulary_for(np.eye(32)[:2], ["a", "b"])
    found = discover_outputs(
        outputs_of(feats, known_text()), image_set(1), 1.0, known_text(), ["x", "y", "z"],
        names, vocab,
    )  # fmt: skip
    assert found.k == 1 and found.clusters[0].name == "a" and found.clusters[0].size == 1
    assert found.selection["rule"] == "none"


def test_fewer_images_than_clusters_is_a_one_line_error():
    feats, _ = grouped_features(3, 1)
    names, vocab = vocabulary_for(np.eye(32)[:3], ["a", "b", "c"])
    with pytest.raises(UeoError, match=r"--clusters 5, but only 3 image\(s\) were rejected"):
        discover_outputs(
            outputs_of(feats, known_text()), image_set(3), 1.0, known_text(), ["x", "y", "z"],
            names, vocab, DiscoverSettings(clusters=5),
        )  # fmt: skip


def test_identical_images_never_ask_k_means_for_more_groups_than_they_hold():
    feats = np.tile(np.eye(32, dtype=np.float32)[:1], (7, 1))
    names, vocab = vocabulary_for(np.eye(32)[:2], ["a", "b"])
    found = discover_outputs(
        outputs_of(feats, known_text()), image_set(7), 1.0, known_text(), ["x", "y", "z"],
        names, vocab,
    )  # fmt: skip
    assert found.k == 1 and found.clusters[0].size == 7
    with pytest.raises(UeoError, match="only 1 distinct"):
        discover_outputs(
            outputs_of(feats, known_text()), image_set(7), 1.0, known_text(), ["x", "y", "z"],
            names, vocab, DiscoverSettings(clusters=2),
        )  # fmt: skip


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"clusters": 0}, "--clusters must be an integer >= 1"),
        ({"max_clusters": 1}, "--max-clusters must be an integer >= 2"),
        ({"k_select": "elbow"}, "--k-select must be one of silhouette, gcd"),
        ({"seed": -1}, "--seed must be an integer >= 0"),
    ],
)
def test_bad_settings_are_one_line_errors(bad, message):
    with pytest.raises(UeoError, match=message):
        DiscoverSettings(**bad).validate()


# Naming: a Hungarian assignment over the votes.


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 5)), elements=st.floats(0, 9))
)
def test_hungarian_naming_never_repeats_a_name_and_is_optimal(score):
    names = assign_names(score)
    k, v = score.shape
    named = names[names >= 0]
    assert len(named) == len(set(named.tolist())) == min(k, v)
    best = max(
        sum(score[c, n] for c, n in zip(rows, cols, strict=True))
        for rows in itertools.permutations(range(k), min(k, v))
        for cols in itertools.permutations(range(v), min(k, v))
    )
    assert sum(score[c, n] for c, n in enumerate(names) if n >= 0) == pytest.approx(best)


def test_votes_decide_a_name_before_probabilities():
    """Two clusters both preferring name 0: the one with more votes for it gets it."""
    votes = np.array([[5, 4], [6, 0]])
    soft = np.array([[0.9, 0.1], [0.1, 0.0]])
    assert assign_names(votes + soft / 3).tolist() == [1, 0]


# Scores against the truth.


def test_grouping_scores_by_hand():
    true = ["dog", "dog", "cat", "cat", "fox", "fox"]
    groups = np.array([1, 1, 1, 2, 3, 3])
    names = ["dog", "dog", "dog", "x", "fox", "fox"]
    top = [["dog", "fox"]] * 3 + [["x"]] + [["fox"]] * 2
    s = grouping_scores(true, groups, names, top, known=["cat"])
    # Hungarian: 1->dog (2), 2->cat (1), 3->fox (2): 5 of 6.
    assert s["cluster_acc"] == pytest.approx(5 / 6)
    assert (s["k"], s["true_k"], s["classes"], s["rejected_unknown"]) == (3, 2, 3, 4)
    assert s["name_top1"] == 1.0 and s["name_top5"] == 1.0  # over dogs and foxes only
    s = grouping_scores(true, groups, ["fox"] * 6, [["cat"]] * 6, known=["cat"])
    assert s["name_top1"] == 0.5 and s["name_top5"] == 0.0
    assert grouping_scores([], np.zeros(0), [], [], ["cat"])["cluster_acc"] is None


def test_evaluation_of_a_discovery_and_of_the_per_image_baseline():
    feats, truth = grouped_features(2, 4)
    names, vocab = vocabulary_for(np.eye(32)[:2], ["a", "b"])
    found = discover_outputs(
        outputs_of(feats, known_text()), image_set(8), 1.0, known_text(), ["x", "y", "z"],
        names, vocab, DiscoverSettings(clusters=2),
    )  # fmt: skip
    true_names = ["a" if t == 0 else "b" for t in truth]
    scores = evaluate_discovery(found, true_names, known=["x"])
    assert scores["cluster_acc"] == 1.0 and scores["name_top1"] == 1.0 and scores["ari"] == 1.0
    assert scores["likely_known_clusters"] == 0 and scores["known_majority_clusters"] == 0
    wrong = evaluate_discovery(found, ["x"] * 8, known=["x"])
    assert wrong["known_majority_clusters"] == 2 and wrong["name_top1"] is None
    assert evaluate_per_image(found, true_names, known=["x"])["name_top1"] == 1.0


# The vocabulary.


def test_wordnet_reader_skips_the_licence_and_reads_multi_word_lemmas(tmp_path):
    path = tmp_path / "index.noun"
    path.write_text(
        WORDNET_HEADER
        + "ice_cream n 1 3 @ ~ + 1 1 07614500  \n"
        + "dog n 7 5 @ ~ #m #p %p 7 1 02084071 10114209  \n"
        + "sea_lion n 1 2 @ ~ 1 0 02077923  \n"
    )
    assert read_wordnet(path) == ["ice cream", "dog", "sea lion"]
    vocab = load_vocabulary(path)  # chosen by its name, index.noun
    assert vocab.names == ("ice cream", "dog", "sea lion") and vocab.source == str(path)


def test_a_malformed_wordnet_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "index.noun"
    path.write_text(WORDNET_HEADER + "dog n 1 0 1 0 02084071\nnot_a_wordnet_line\n")
    with pytest.raises(UeoError, match=r"index.noun:5 is not a WordNet index line"):
        read_wordnet(path)


def test_default_vocabulary_is_wordnet_or_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(
        ueo.discovery.vocabulary, "WORDNET_NOUNS", tmp_path / "absent" / "index.noun"
    )
    with pytest.raises(UeoError, match="apt-get install wordnet-base.*--vocabulary FILE"):
        load_vocabulary()
    present = tmp_path / "index.noun"
    present.write_text(WORDNET_HEADER + "cat n 1 0 1 0 02121620\n")
    monkeypatch.setattr(ueo.discovery.vocabulary, "WORDNET_NOUNS", present)
    assert load_vocabulary().names == ("cat",)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_a_user_vocabulary_with_a_bom(tmp_path, encoding):
    path = tmp_path / "names.txt"
    path.write_bytes("Zebra\r\n\r\n  sea_lion \r\ncrème brûlée\r\nzebra\r\n".encode(encoding))
    if encoding == "utf-8-sig":
        assert path.read_bytes().startswith(codecs.BOM_UTF8)
    vocab = load_vocabulary(path)
    assert vocab.names == ("Zebra", "sea_lion", "crème brûlée")  # the later "zebra" dropped


def test_known_classes_are_never_candidate_names(tmp_path):
    vocab = Vocabulary(("Red Square", "zebra", "green circle", "sea lion"), "x")
    assert without_known(vocab, CLASSES).names == ("zebra", "sea lion")
    with pytest.raises(UeoError, match="holds only known class names"):
        without_known(Vocabulary(("red_square",), "x"), CLASSES)


def test_wordnet_synonyms_of_a_known_first_sense_are_not_candidates(tmp_path, caplog):
    """From WordNet, the lemmas sharing a known class's first synset go with it (`domestic
    dog` with `dog`); those of its other senses stay (`hot dog`, `frankfurter`), and so does
    everything in a user's file, which has no senses."""
    path = tmp_path / "index.noun"
    path.write_text(
        WORDNET_HEADER
        + "dog n 3 2 @ ~ 3 1 02084071 07697537 10114209  \n"
        + "domestic_dog n 1 1 @ 1 0 02084071  \n"
        + "hot_dog n 1 1 @ 1 0 07697537  \n"
        + "frankfurter n 1 0 1 0 07697537  \n"
        + "Canis_familiaris n 1 1 @ 1 0 02084071  \n"
        + "zebra n 1 2 @ ~ 1 0 02391049  \n"
        + "odd_entry n\n"  # no synsets: kept, never matched
    )
    vocab = load_vocabulary(path)
    assert vocab.senses["dog"] == (2084071, 7697537, 10114209)
    assert vocab.senses["odd entry"] == ()
    with caplog.at_level(logging.INFO, logger="ueo"):
        left = without_known(vocab, ["Dog", "cat"])
    assert left.names == ("hot dog", "frankfurter", "zebra", "odd entry")
    assert "Left out 2 synonym(s) of the known classes" in caplog.text
    assert without_known(vocab, ["zebra"]).names == tuple(n for n in vocab.names if n != "zebra")
    plain = Vocabulary(vocab.names, "user file")
    assert without_known(plain, ["dog"]).names == vocab.names[1:]


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_vocabulary_file_is_an_error(tmp_path, content):
    path = tmp_path / "names.txt"
    path.write_text(content)
    with pytest.raises(UeoError, match="holds no names"):
        load_vocabulary(path)
    with pytest.raises(UeoError, match="not found"):
        load_vocabulary(tmp_path / "missing.txt")


def adapted_model():
    """A tiny model whose context has moved away from its initialisation."""
    model = load_calibrated(classes=CLASSES)
    with torch.no_grad():
        model.prompt.ctx.add_(0.05 * torch.randn(model.prompt.ctx.shape, generator=_gen()))
    return model


def _gen():
    g = torch.Generator()
    g.manual_seed(7)
    return g


def test_names_are_encoded_with_the_adapted_context_in_chunks():
    model = adapted_model()
    state = torch.random.get_rng_state()
    with torch.no_grad():
        expected = model.text_features()
    got = encode_names(model, tuple(model.class_names), progress=False, chunk=3)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator untouched


def test_names_too_long_for_the_context_are_left_out(caplog):
    model = adapted_model()
    long = " ".join(["word"] * 30)
    assert fitting_names(model, ("zebra", long, "sea lion")) == ("zebra", "sea lion")
    assert "Leaving out 1 vocabulary name(s) too long" in caplog.text


def test_the_encoded_vocabulary_is_cached_per_context_and_names(tmp_path, monkeypatch):
    model = adapted_model()
    vocab = Vocabulary(("zebra", "sea lion", "ice cream"), "x")
    names, first = encode_vocabulary(model, vocab, progress=False, cache=tmp_path)
    assert names == vocab.names and len(list(tmp_path.iterdir())) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(ueo.discovery.vocabulary, "encode_names", refuse)
    names, again = encode_vocabulary(model, vocab, progress=False, cache=tmp_path)
    assert torch.equal(first, again)
    monkeypatch.undo()
    with torch.no_grad():
        model.prompt.ctx.add_(0.1)  # another adaptation: another encoding
    _, moved = encode_vocabulary(model, vocab, progress=False, cache=tmp_path)
    assert not torch.allclose(moved, first) and len(list(tmp_path.iterdir())) == 2
    _, other = encode_vocabulary(
        model, Vocabulary(("zebra", "sea lion"), "y"), progress=False, cache=tmp_path
    )
    assert torch.allclose(other, moved[:2], atol=1e-6) and len(list(tmp_path.iterdir())) == 3


def test_a_damaged_cache_file_is_encoded_again(tmp_path, caplog):
    model = adapted_model()
    vocab = Vocabulary(("zebra", "sea lion"), "x")
    _, first = encode_vocabulary(model, vocab, progress=False, cache=tmp_path)
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(b"not safetensors")
    _, again = encode_vocabulary(model, vocab, progress=False, cache=tmp_path)
    assert torch.equal(first, again) and "damaged vocabulary cache" in caplog.text


# The image pass keeps the features when asked, at no other change.


def test_infer_keeps_the_features_of_the_same_pass(image_folder):
    model = load_calibrated(classes=CLASSES)
    images = load_image_set(image_folder, CLASSES)
    plain = infer(model, images, QUIET)
    kept = infer(model, images, QUIET, features=True)
    assert plain.features is None
    assert np.array_equal(plain.cos, kept.cos)
    text = model.text_features().detach().numpy()
    assert np.allclose(kept.features @ text.T, kept.cos, atol=1e-6)
    assert np.allclose(np.linalg.norm(kept.features, axis=1), 1.0, atol=1e-5)


# The command, end to end on the bundled tiny model.


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("discover")
    run = untrained_run(root)
    images = root / "more"
    make_folder(images, per_class=6, seed=3)
    vocab = root / "vocabulary.txt"
    vocab.write_text("\ufeffblack noise\nzebra\nRed_Square\nsea lion\nice cream\n")
    return {**run, "images": images, "vocabulary": vocab}


def test_discover_command_end_to_end(bundled_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UEO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "found"
    argv = [
        "discover", "--adapter", str(bundled_run["adapter"]), "--images",
        str(bundled_run["images"]), "--vocabulary", str(bundled_run["vocabulary"]),
        "--out", str(out), "--device", "cpu", "--workers", "0", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "discover.json").read_text())
    rows = list(csv.DictReader((out / "clusters.csv").open()))
    assert list(rows[0]) == ["image", "cluster", "name", "distance"]
    assert len(rows) == record["counts"]["rejected"] > 0
    assert record["counts"]["images"] == 30 and record["threshold_source"] == "adapter"
    assert record["vocabulary"]["known_left_out"] == 1  # Red_Square is a known class
    assert record["vocabulary"]["size"] == 4 and record["settings"]["k_select"] == "silhouette"
    k = len(record["clusters"])
    assert {int(r["cluster"]) for r in rows} == set(range(1, k + 1))
    assert sorted(p.name for p in (out / "sheets").iterdir()) == [
        f"cluster-{i:02d}.png" for i in range(1, k + 1)
    ]
    names = [c["name"] for c in record["clusters"] if c["name"]]
    assert len(names) == len(set(names)) and "Red_Square" not in names
    assert f"{record['counts']['rejected']} of 30 images rejected" in printed
    assert "| cluster | images | name |" in (out / "clusters.md").read_text()
    assert len(list((tmp_path / "cache" / "vocabulary").iterdir())) == 1
    # Run again into the same folder, with a fixed k: the old discovery is replaced whole.
    assert main([*argv, "--clusters", "1"]) == 0
    assert len(list((out / "sheets").iterdir())) == 1
    assert json.loads((out / "discover.json").read_text())["selection"]["rule"] == "fixed"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clusters", "500"], "--clusters 500, but only"),
        (["--threshold", "2"], "--threshold must be in [0, 1]"),
        (["--max-clusters", "1"], "--max-clusters must be an integer >= 2"),
    ],
)
def test_discover_command_one_line_errors(bundled_run, tmp_path, capsys, extra, message):
    argv = [
        "discover", "--adapter", str(bundled_run["adapter"]), "--data",
        str(bundled_run["images"]), "--vocabulary", str(bundled_run["vocabulary"]),
        "--out", str(tmp_path / "x"), "--workers", "0", "--quiet", *extra,
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ueo: error: ") and message in err[0]


def test_discover_without_wordnet_or_vocabulary_says_what_to_install(
    bundled_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(ueo.discovery.vocabulary, "WORDNET_NOUNS", tmp_path / "none" / "index.noun")
    argv = ["discover", "--adapter", str(bundled_run["adapter"]), "--data"]
    argv += [str(bundled_run["images"]), "--out", str(tmp_path / "x"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "wordnet-base" in err and err.count("\n") == 1


def test_discover_refuses_a_folder_of_other_files(bundled_run, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    argv = ["discover", "--adapter", str(bundled_run["adapter"]), "--data"]
    argv += [str(bundled_run["images"]), "--vocabulary", str(bundled_run["vocabulary"])]
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 2
    assert "holds other files and no ueo discovery" in capsys.readouterr().err
    assert main([*argv, "--out", str(bundled_run["adapter"]), "--quiet"]) == 2
    assert "holds a training run" in capsys.readouterr().err


def test_parser_defaults_match_the_library():
    args = build_parser().parse_args(["discover", "--adapter", "a", "--images", "d", "--out", "o"])
    assert args.data == "d" and args.max_clusters == DEFAULT_MAX_CLUSTERS
    default = DiscoverSettings()
    assert (args.clusters, args.k_select, args.seed) == (
        default.clusters,
        default.k_select,
        default.seed,
    )


def test_the_python_api_exports_discover():
    import ueo.api
    import ueo.discovery.groups  # noqa: F401  (the submodule must not shadow the function)
    from ueo import DiscoverSettings, discover, load_vocabulary, without_known

    assert discover is ueo.api.discover and callable(discover)
    assert DiscoverSettings is ueo.discovery.settings.DiscoverSettings
    assert (load_vocabulary, without_known) == (
        ueo.discovery.vocabulary.load_vocabulary,
        ueo.discovery.vocabulary.without_known,
    )


@pytest.mark.parametrize("threshold", [float("nan"), -0.1, 1.5])
def test_a_threshold_that_is_no_mcm_score_is_refused(threshold):
    feats, _ = grouped_features(2, 3)
    names, vocab = vocabulary_for(np.eye(32)[:2], ["a", "b"])
    with pytest.raises(UeoError, match="threshold must be an MCM score"):
        discover_outputs(
            outputs_of(feats, known_text()), image_set(6), threshold, known_text(),
            ["x", "y", "z"], names, vocab,
        )  # fmt: skip


def test_discover_command_with_nothing_rejected_says_so(bundled_run, tmp_path, capsys):
    out = tmp_path / "none"
    argv = ["discover", "--adapter", str(bundled_run["adapter"]), "--data"]
    argv += [str(bundled_run["images"]), "--vocabulary", str(bundled_run["vocabulary"])]
    assert main([*argv, "--out", str(out), "--threshold", "0", "--quiet"]) == 0
    assert "No image was rejected (threshold 0): no groups." in capsys.readouterr().out
    assert (out / "clusters.csv").read_text() == "image,cluster,name,distance\n"
    assert json.loads((out / "discover.json").read_text())["clusters"] == []
    assert "nothing to group" in (out / "clusters.md").read_text()
