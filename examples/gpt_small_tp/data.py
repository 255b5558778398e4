"""Text for the GPT example: a local corpus, a tokenizer, and next-token windows.

Nothing is ever downloaded. By default the corpus is the running interpreter's own standard library
(its ``.py`` files, sorted by relative path, so one interpreter always yields the same corpus) and
the tokenizer is byte-level (vocabulary 257), which needs no vocabulary file. Pass text files or
directories to train on your own text, and a ``tokenizer.json``, a GPT-2 ``vocab.json`` +
``merges.txt`` directory or a ``.tiktoken`` ranks file to use BPE. Files are read as UTF-8; bytes
that are not valid UTF-8 are replaced by U+FFFD (``errors="replace"``) instead of failing.

Example:
  >>> corpus = load_corpus(max_bytes=2_000_000)                          # doctest: +SKIP
  >>> print(corpus.describe())
  >>> loader = train_loader(corpus, seq_len=256, batch_size=32)
  >>> w = next(loader)["tokens"]                 # [32, 257]: inputs w[:, :-1], targets w[:, 1:]
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sysconfig
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from titanax.data import DataSource, GrainLoader
from titanax.data.loader import ArrayLoader
from titanax.exceptions import TitanaxError

__all__ = [
    "Tokenizer", "ByteTokenizer", "TokenizersBPE", "TiktokenBPE", "load_tokenizer",
    "Corpus", "load_corpus", "stdlib_files", "windows", "train_loader", "grain_train_loader",
    "heldout_batches",
]

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer split (tiktoken's r50k/gpt2 pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class Tokenizer(Protocol):
    """What the pipeline needs of a tokenizer: ``encode``/``decode`` and an end-of-text id."""

    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus end-of-text 256: any text, no vocabulary file."""

    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of ``text`` as int32 ids."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of ``ids``; end-of-text shows as ``<|endoftext|>``, bad bytes as U+FFFD."""
        ids = np.asarray(ids, np.int64)
        parts = np.split(ids, np.flatnonzero(ids == self.eot_id))  # later parts start with eot
        return EOT.join(bytes(p[p != self.eot_id].astype(np.uint8)).decode("utf-8", "replace")
                        for p in parts)


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise TitanaxError(f"this tokenizer needs the {module!r} package, which is not installed",
                           suggestion=f"pip install {module}") from e


class TokenizersBPE:
    """A Hugging Face ``tokenizers`` tokenizer; ``<|endoftext|>`` is added if it lacks one."""

    def __init__(self, tok: Any) -> None:
        if tok.token_to_id(EOT) is None:
            tok.add_special_tokens([EOT])
        # Text that happens to contain "<|endoftext|>" must not turn into a file separator.
        if hasattr(tok, "encode_special_tokens"):
            tok.encode_special_tokens = True
        self._tok = tok
        self.eot_id = int(tok.token_to_id(EOT))
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_file(cls, path: str) -> TokenizersBPE:
        """Loads a serialised ``tokenizer.json``."""
        return cls(_require("tokenizers").Tokenizer.from_file(str(path)))

    @classmethod
    def from_vocab_merges(cls, vocab: str, merges: str) -> TokenizersBPE:
        """Builds GPT-2's byte-level BPE from its ``vocab.json`` and ``merges.txt``."""
        tk = _require("tokenizers")
        tok = tk.Tokenizer(tk.models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        return cls(tok)

    def encode(self, text: str) -> np.ndarray:
        """Returns the BPE ids of ``text`` (no special tokens added) as int32."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of ``ids``, end-of-text included."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class TiktokenBPE:
    """``tiktoken`` BPE from a ``.tiktoken`` ranks file, GPT-2 split, end-of-text after the ranks."""

    def __init__(self, path: str) -> None:
        _require("tiktoken")
        import tiktoken.load

        # load_tiktoken_bpe copies even local files into a cache keyed by path, and later loads of
        # that path get the old copy after the file changes; an empty cache dir turns that off.
        saved = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""
        try:
            ranks = tiktoken.load.load_tiktoken_bpe(str(path))
        finally:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
            if saved is not None:
                os.environ["TIKTOKEN_CACHE_DIR"] = saved
        self.eot_id = max(ranks.values()) + 1
        self._enc = tiktoken.Encoding(name=pathlib.Path(path).stem, pat_str=GPT2_PATTERN,
                                      mergeable_ranks=ranks, special_tokens={EOT: self.eot_id})
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> np.ndarray:
        """Returns the BPE ids of ``text`` as int32; ``<|endoftext|>`` in the text stays plain text."""
        return np.asarray(self._enc.encode_ordinary(text), np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of ``ids``, end-of-text included."""
        return self._enc.decode([int(i) for i in ids], errors="replace")


def load_tokenizer(spec: str | os.PathLike | None = None) -> Tokenizer:
    """Picks a tokenizer from a short spec.

    Args:
      spec: ``None`` or ``"bytes"`` (byte-level); a ``*.json`` file (``tokenizers``); a directory
        with ``tokenizer.json`` or GPT-2's ``vocab.json`` + ``merges.txt``; a ``*.tiktoken`` file.

    Returns:
      The tokenizer.

    Raises:
      TitanaxError: a spec that is none of these, or a missing ``tokenizers``/``tiktoken`` package.
    """
    if spec is None or str(spec) == "bytes":
        return ByteTokenizer()
    p = pathlib.Path(spec)
    if p.is_file() and p.suffix == ".json":
        return TokenizersBPE.from_file(str(p))
    if p.is_file() and p.suffix == ".tiktoken":
        return TiktokenBPE(str(p))
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return TokenizersBPE.from_file(str(p / "tokenizer.json"))
    if p.is_dir() and (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        return TokenizersBPE.from_vocab_merges(str(p / "vocab.json"), str(p / "merges.txt"))
    raise TitanaxError(
        f"unknown tokenizer {spec!r}" + ("" if p.exists() else " (no such file or directory)"),
        suggestion="pass 'bytes', an existing tokenizer.json, a directory holding tokenizer.json "
        "or vocab.json + merges.txt, or a .tiktoken ranks file",
    )


def _walk(root: pathlib.Path, keep: Any) -> list[pathlib.Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if keep(d, True)]
        found += [pathlib.Path(dirpath, f) for f in filenames if keep(f, False)]
    # Sort by relative POSIX path: os.walk's order depends on the file system.
    return sorted(found, key=lambda f: f.relative_to(root).as_posix())


def stdlib_files() -> list[pathlib.Path]:
    """Returns the interpreter's standard-library ``.py`` files, sorted by relative POSIX path."""
    return _walk(pathlib.Path(sysconfig.get_paths()["stdlib"]),
                 lambda name, is_dir: name not in _SKIP_DIRS if is_dir else name.endswith(".py"))


def _user_files(paths: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    files = []
    for path in paths:
        p = pathlib.Path(path)
        if p.is_dir():  # hidden entries (.git, .venv) and bytecode are not text to learn from
            files += _walk(p, lambda name, is_dir: not name.startswith(".") and name != "__pycache__")
        elif p.is_file():
            files.append(p)
        else:
            raise TitanaxError(f"corpus path {str(p)!r} does not exist",
                               suggestion="pass existing text files or directories, or no paths "
                               "for the Python standard library")
    return files


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Tokenised train and held-out text; every file is followed by the end-of-text id.

    Attributes:
      train, heldout: 1-D token ids (uint16 when the vocabulary fits, else int32).
      tokenizer: what made (and decodes) them.
      train_files, heldout_files: how many files went to each split.
      num_bytes: the bytes read from disk.
    """

    train: np.ndarray
    heldout: np.ndarray
    tokenizer: Tokenizer
    train_files: int
    heldout_files: int
    num_bytes: int

    def describe(self) -> str:
        """Returns a one-line summary for logs."""
        return (f"corpus: {self.train_files + self.heldout_files} files ({self.train_files} train / "
                f"{self.heldout_files} held-out), {self.num_bytes / 1e6:.2f} MB -> "
                f"{self.train.size:,} train + {self.heldout.size:,} held-out tokens, "
                f"{type(self.tokenizer).__name__} (vocab {self.tokenizer.vocab_size})")


def load_corpus(paths: Sequence[str | os.PathLike] | None = None, *,
                tokenizer: Tokenizer | str | os.PathLike | None = None, max_bytes: int | None = None,
                heldout_fraction: float = 0.05) -> Corpus:
    """Reads, splits by file and tokenises a corpus, all in memory.

    Args:
      paths: text files and directories (expanded recursively, sorted, skipping hidden entries);
        ``None`` takes the standard library's ``.py`` files.
      tokenizer: a tokenizer, or a spec for :func:`load_tokenizer` (``None``: bytes).
      max_bytes: read whole files in order up to this many bytes, cutting the last one short.
      heldout_fraction: every ``round(1 / heldout_fraction)``-th file is held out.

    Returns:
      The :class:`Corpus`.

    Raises:
      TitanaxError: a missing path, a bad argument, or a split left without files.
    """
    if max_bytes is not None and max_bytes < 1:
        raise TitanaxError(f"max_bytes={max_bytes} must be >= 1", suggestion="pass None for all")
    if not 0 < heldout_fraction < 1:
        raise TitanaxError(f"heldout_fraction={heldout_fraction} must be in (0, 1)",
                           suggestion="use e.g. 0.05: one file in 20 is held out")
    tok = load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)) \
        else tokenizer
    if isinstance(paths, (str, os.PathLike)):  # one path, not a string of one-letter paths
        paths = [paths]
    files = stdlib_files() if paths is None else _user_files(paths)
    texts, budget = [], max_bytes
    for f in files:
        if budget is not None and budget <= 0:
            break
        with open(f, "rb") as fh:
            raw = fh.read() if budget is None else fh.read(budget)
        budget = None if budget is None else budget - len(raw)
        texts.append(raw)
    k = round(1 / heldout_fraction)
    split = {"train": [t for i, t in enumerate(texts) if i % k != k - 1],
             "held-out": [t for i, t in enumerate(texts) if i % k == k - 1]}
    for name, part in split.items():
        if not part:
            raise TitanaxError(
                f"the {name} split is empty: {len(texts)} files, one in {k} held out",
                suggestion="give more files (raise max_bytes)" if name == "held-out"
                else "lower heldout_fraction (at most 0.5 keeps half for training)")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    eot = np.array([tok.eot_id], np.int32)
    ids = {name: np.concatenate([x for t in part
                                 for x in (tok.encode(t.decode("utf-8", "replace")), eot)]).astype(dtype)
           for name, part in split.items()}
    return Corpus(ids["train"], ids["held-out"], tok, len(split["train"]), len(split["held-out"]),
                  sum(map(len, texts)))


def windows(tokens: np.ndarray, seq_len: int, *, name: str = "token stream") -> np.ndarray:
    """Cuts a token stream into next-token windows: inputs ``w[:, :-1]``, targets ``w[:, 1:]``.

    Windows start every ``seq_len`` tokens and hold ``seq_len + 1``, so neighbours share one token
    and every token after the first is a target exactly once. The result is a read-only view.

    Args:
      tokens: 1-D token ids.
      seq_len: the model's sequence length.
      name: what ``tokens`` are, for the error message.

    Returns:
      ``[(len(tokens) - 1) // seq_len, seq_len + 1]`` windows, in ``tokens``' dtype.

    Raises:
      TitanaxError: ``seq_len`` < 1 or fewer than ``seq_len + 1`` tokens.
    """
    tokens = np.ascontiguousarray(tokens)
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise TitanaxError(f"seq_len={seq_len!r} must be an integer >= 1", suggestion="e.g. 256")
    n = (tokens.size - 1) // seq_len
    if tokens.ndim != 1 or n < 1:
        raise TitanaxError(
            f"the {name} ({tokens.size} tokens, shape {tokens.shape}) does not fill one window of "
            f"{seq_len + 1}", suggestion="lower seq_len, or give more text: raise max_bytes (and "
            "heldout_fraction for held-out windows)")
    step = tokens.strides[0]
    return np.lib.stride_tricks.as_strided(tokens, (n, seq_len + 1), (step * seq_len, step),
                                           writeable=False)


def train_loader(corpus: Corpus, seq_len: int, batch_size: int, seed: int = 0,
                 **options: Any) -> ArrayLoader:
    """Shuffled, resumable training batches ``{"tokens": [batch, seq_len + 1]}``.

    Args:
      corpus: from :func:`load_corpus`.
      seq_len: the model's sequence length.
      batch_size: the global batch size; each process yields its slice.
      seed: seeds the per-epoch shuffle.
      **options: passed to :class:`~titanax.data.ArrayLoader` (e.g. ``process_index``, ``epochs``).

    Returns:
      The loader (save ``loader.state()`` with checkpoints to resume). Batches keep the corpus
      dtype (uint16 for small vocabularies), so cast to int32 on device before embedding.
    """
    tokens = windows(corpus.train, seq_len, name="training split")
    return ArrayLoader({"tokens": tokens}, batch_size=batch_size, seed=seed, **options)


def _tokens_record(window: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": window}


def grain_train_loader(corpus: Corpus, seq_len: int, batch_size: int, seed: int = 0,
                       **options: Any) -> GrainLoader:
    """:func:`train_loader` read through Grain: the same windows as a ``grain.MapDataset``.

    Args:
      corpus: from :func:`load_corpus`.
      seq_len: the model's sequence length.
      batch_size: the global batch size; each process yields its share.
      seed: seeds Grain's per-epoch shuffle.
      **options: passed to :class:`~titanax.data.GrainLoader` (``process_index``, ``epochs``,
        ``read_options``).

    Returns:
      A ``tx.data.GrainLoader`` of ``{"tokens": [batch, seq_len + 1]}`` batches; its state (the
      windows the whole job has consumed) resumes on any number of processes or devices.

    Raises:
      TitanaxError: ``grain`` is not installed.
    """
    grain = _require("grain")
    records = grain.MapDataset.source(windows(corpus.train, seq_len, name="training split"))
    return GrainLoader(records.map(_tokens_record), batch_size=batch_size, seed=seed, **options)


def heldout_batches(corpus: Corpus, seq_len: int, batch_size: int,
                    max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """Fixed evaluation batches: held-out windows in order, full (global) batches only.

    Args:
      corpus: from :func:`load_corpus`.
      seq_len: the model's sequence length.
      batch_size: windows per batch; the ragged tail is dropped.
      max_batches: keep at most this many batches (``None``: all).

    Returns:
      ``[{"tokens": [batch_size, seq_len + 1]}, ...]``, the same on every call.

    Raises:
      TitanaxError: fewer held-out windows than one batch.
    """
    w = windows(corpus.heldout, seq_len, name="held-out split")
    if batch_size < 1 or len(w) < batch_size:
        raise TitanaxError(
            f"{len(w)} held-out windows of {seq_len + 1} tokens do not fill a batch of {batch_size}",
            suggestion="lower batch_size or seq_len, or raise heldout_fraction or max_bytes")
    n = len(w) // batch_size if max_batches is None else min(len(w) // batch_size, max_batches)
    return [{"tokens": np.array(w[i * batch_size:(i + 1) * batch_size])} for i in range(n)]


def text_source(paths: Sequence[str] | None = None, *, tokenizer: str | None = None,
                max_bytes: int | None = None, seq_len: int = 64, eval_batches: int | None = 8,
                loader: str = "array", batch_size: int, seed: int) -> DataSource:
    """The run-config data factory (``data.factory: examples.gpt_small_tp.data:text_source``).

    The corpus is read when training starts, not here, so ``titanax describe`` stays instant.

    Args:
      paths: text files or folders (``None``: this Python's standard library sources).
      tokenizer: see :func:`load_tokenizer` (``None``: bytes).
      max_bytes: read at most this much text.
      seq_len: tokens per training sequence.
      eval_batches: held-out batches per evaluation (``None``: all of them).
      loader: ``"array"`` (:func:`train_loader`, in memory) or ``"grain"``
        (:func:`grain_train_loader`, a Grain pipeline; needs ``pip install 'titanax[grain]'``).
      batch_size: global batch size (sequences).
      seed: shuffling seed.

    Returns:
      A ``tx.data.DataSource`` of ``{"tokens": [batch, seq_len + 1]}`` batches, each process
      reading its slice.
    """
    if loader not in ("array", "grain"):
        raise TitanaxError(f"loader={loader!r} is not a training loader of this example",
                           suggestion="use loader: array (in memory) or loader: grain (a Grain pipeline)")
    make_loader = grain_train_loader if loader == "grain" else train_loader
    tok = load_tokenizer(tokenizer)
    loaded: list[Corpus] = []

    def corpus() -> Corpus:
        if not loaded:
            loaded.append(load_corpus(paths, tokenizer=tok, max_bytes=max_bytes))
            if jax.process_index() == 0:
                print(loaded[0].describe(), flush=True)
        return loaded[0]

    def held_out() -> ArrayLoader:
        rows = np.concatenate([b["tokens"] for b in heldout_batches(corpus(), seq_len, batch_size, eval_batches)])
        return ArrayLoader({"tokens": rows}, batch_size=batch_size, shuffle=False, epochs=1)

    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    return DataSource(
        train=lambda: make_loader(corpus(), seq_len, batch_size, seed=seed),
        eval=held_out,
        example={"tokens": np.zeros((batch_size, seq_len + 1), dtype)},
        tokens_per_example=seq_len,
        vocab_size=tok.vocab_size,
        description=f"text from {'the Python standard library' if paths is None else ', '.join(map(str, paths))}, "
                    f"{type(tok).__name__} tokens (vocab {tok.vocab_size}), {seq_len} per sequence"
                    + (", read through Grain" if loader == "grain" else ""),
    )
