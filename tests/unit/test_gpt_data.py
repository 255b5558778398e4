"""The GPT example's data pipeline: stdlib corpus, file split, tokenizers, windows, loaders."""

import base64
import importlib.util
import pathlib
import sys
import sysconfig

import numpy as np
import pytest

from titanax.data import ArrayLoader
from titanax.exceptions import TitanaxError

ROOT = pathlib.Path(__file__).parent.parent.parent
SMALL = 200_000  # bytes of stdlib: enough files for a 1-in-4 held-out split, fast to tokenise


def _load_module():
    # examples/ is not a package on sys.path; load the module from its file.
    spec = importlib.util.spec_from_file_location("gpt_data", ROOT / "examples" / "gpt_small_tp" / "data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is being run
    spec.loader.exec_module(module)
    return module


gd = _load_module()


@pytest.fixture(scope="module")
def corpus():
    return gd.load_corpus(max_bytes=SMALL, heldout_fraction=0.25)


def test_stdlib_corpus_is_deterministic_and_capped(corpus):
    again = gd.load_corpus(max_bytes=SMALL, heldout_fraction=0.25)
    np.testing.assert_array_equal(corpus.train, again.train)
    np.testing.assert_array_equal(corpus.heldout, again.heldout)
    assert corpus.num_bytes == SMALL and corpus.train.dtype == np.uint16
    files = gd.stdlib_files()
    rel = [f.relative_to(sysconfig.get_paths()["stdlib"]).as_posix() for f in files]
    assert all(f.endswith(".py") for f in rel) and len(rel) > 100 and rel == sorted(rel)
    assert not any(part in ("site-packages", "dist-packages", "__pycache__") for f in rel for part in f.split("/"))
    assert "corpus:" in corpus.describe() and "ByteTokenizer" in corpus.describe()


def test_train_and_heldout_split_by_whole_files(tmp_path):
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text(f"<file {i}>" * 5)
    c = gd.load_corpus([tmp_path], heldout_fraction=0.25)  # every 4th file: f3, f7
    assert (c.train_files, c.heldout_files) == (6, 2)
    eot = c.tokenizer.eot_id
    assert (c.train == eot).sum() == 6 and (c.heldout == eot).sum() == 2 and c.heldout[-1] == eot
    held = c.tokenizer.decode(c.heldout).split(gd.EOT)[:-1]
    train = c.tokenizer.decode(c.train).split(gd.EOT)[:-1]
    assert held == ["<file 3>" * 5, "<file 7>" * 5]
    assert not set(held) & set(train) and len(set(train)) == 6


def test_byte_tokenizer_round_trip_non_ascii():
    tok = gd.load_tokenizer(None)
    assert isinstance(tok, gd.ByteTokenizer) and tok.vocab_size == 257 and tok.eot_id == 256
    text = "naïve café — 日本語 🐍\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode()) and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([ids, [256], tok.encode("x")])) == text + gd.EOT + "x"
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character decodes, replaced


def test_user_files_and_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "sub" / "a.txt").write_text("ay")
    (tmp_path / "d" / ".hidden").write_text("secret")
    (tmp_path / "bad.txt").write_bytes(b"ok\xff\xfe")  # not UTF-8: replaced, not an error
    (tmp_path / "one.txt").write_text("one")
    c = gd.load_corpus([tmp_path / "one.txt", tmp_path / "d", tmp_path / "bad.txt"], heldout_fraction=0.5)
    text = c.tokenizer.decode(c.train) + "|" + c.tokenizer.decode(c.heldout)
    # order: one.txt, d/b.txt, d/sub/a.txt, bad.txt -> train: one, a ; held-out: bee, bad
    assert text == f"one{gd.EOT}ay{gd.EOT}|bee{gd.EOT}ok\ufffd\ufffd{gd.EOT}"


def test_max_bytes_truncates_last_file(tmp_path):
    for name in "abcd":
        (tmp_path / f"{name}.txt").write_text(name * 10)
    c = gd.load_corpus(tmp_path, max_bytes=25, heldout_fraction=0.5)  # one path needs no list
    assert c.num_bytes == 25 and c.train_files + c.heldout_files == 3
    assert c.tokenizer.decode(c.train) == "a" * 10 + gd.EOT + "c" * 5 + gd.EOT


def test_windows_shape_overlap_and_shift():
    tokens = np.arange(23, dtype=np.uint16)
    w = gd.windows(tokens, 5)
    assert w.shape == (4, 6) and w.dtype == np.uint16
    np.testing.assert_array_equal(w[:, 0], [0, 5, 10, 15])
    np.testing.assert_array_equal(w[:-1, -1], w[1:, 0])  # neighbours share one token
    inputs, targets = w[:, :-1], w[:, 1:]
    np.testing.assert_array_equal(targets, inputs + 1)
    np.testing.assert_array_equal(np.sort(targets.ravel()), np.arange(1, 21))  # each a target once
    with pytest.raises(TitanaxError, match="one window"):
        gd.windows(tokens[:5], 5)
    with pytest.raises(TitanaxError, match="seq_len"):
        gd.windows(tokens, 0)


def test_train_loader_batches(corpus):
    loader = gd.train_loader(corpus, seq_len=64, batch_size=8, seed=3)
    assert isinstance(loader, ArrayLoader)
    batch = next(loader)
    assert set(batch) == {"tokens"} and batch["tokens"].shape == (8, 65)
    again = next(gd.train_loader(corpus, seq_len=64, batch_size=8, seed=3))
    np.testing.assert_array_equal(batch["tokens"], again["tokens"])
    resumed = ArrayLoader.from_state({"tokens": gd.windows(corpus.train, 64)}, loader.state())
    np.testing.assert_array_equal(next(resumed)["tokens"], next(loader)["tokens"])


def test_heldout_batches_fixed_and_full(corpus):
    batches = gd.heldout_batches(corpus, seq_len=64, batch_size=8)
    n_windows = (corpus.heldout.size - 1) // 64
    assert len(batches) == n_windows // 8 > 0
    assert all(b["tokens"].shape == (8, 65) for b in batches)
    np.testing.assert_array_equal(batches[0]["tokens"][0], corpus.heldout[:65])  # in order
    again = gd.heldout_batches(corpus, seq_len=64, batch_size=8, max_batches=2)
    assert len(again) == 2 and all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(again, batches))
    with pytest.raises(TitanaxError, match="do not fill a batch"):
        gd.heldout_batches(corpus, seq_len=64, batch_size=n_windows + 1)
    with pytest.raises(TitanaxError, match="held-out split .* does not fill one window"):
        gd.heldout_batches(corpus, seq_len=corpus.heldout.size, batch_size=1)


def test_errors(tmp_path):
    with pytest.raises(TitanaxError, match="does not exist") as e:
        gd.load_corpus([tmp_path / "nope.txt"])
    assert e.value.suggestion
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(TitanaxError, match="held-out split is empty") as e:
        gd.load_corpus([tmp_path / "a.txt"])
    assert "max_bytes" in e.value.suggestion
    with pytest.raises(TitanaxError, match="train split is empty"):
        gd.load_corpus([tmp_path / "a.txt"], heldout_fraction=0.9)
    with pytest.raises(TitanaxError, match="unknown tokenizer") as e:
        gd.load_tokenizer(str(tmp_path / "a.txt"))
    assert ".tiktoken" in e.value.suggestion and "tokenizer.json" in e.value.suggestion


def _train_bpe(vocab_size=400):
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[gd.EOT], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in gd.stdlib_files()[:5]]
    tok.train_from_iterator(texts, trainer)
    return tok


def test_tokenizers_bpe_json_and_vocab_merges(tmp_path):
    tok = _train_bpe()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "gpt2").mkdir()
    tok.model.save(str(tmp_path / "gpt2"))  # vocab.json + merges.txt
    text = "def f(x):\n    return x  # naïve 日本 <|endoftext|>\n"
    for spec in (tmp_path / "tokenizer.json", tmp_path / "gpt2"):
        bpe = gd.load_tokenizer(str(spec))
        assert isinstance(bpe, gd.TokenizersBPE) and bpe.vocab_size == 400
        ids = bpe.encode(text)
        assert ids.dtype == np.int32 and len(ids) < len(text.encode())  # merges were applied
        assert bpe.eot_id not in ids  # literal "<|endoftext|>" in text is not a separator
        assert bpe.decode(ids) == text
        assert bpe.decode([bpe.eot_id]) == gd.EOT
    c = gd.load_corpus(max_bytes=20_000, tokenizer=str(tmp_path / "tokenizer.json"), heldout_fraction=0.5)
    assert c.train.dtype == np.uint16 and c.train.max() < 400 and c.train[-1] == c.tokenizer.eot_id


def test_tiktoken_ranks_file(tmp_path):
    pytest.importorskip("tiktoken")
    merges = [b"de", b"def", b"  ", b"    ", b"re", b"ret", b"retu", b"retur", b"return"]
    ranks = [bytes([b]) for b in range(256)] + merges
    path = tmp_path / "tiny.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks)))
    bpe = gd.load_tokenizer(str(path))
    assert isinstance(bpe, gd.TiktokenBPE)
    assert bpe.eot_id == len(ranks) and bpe.vocab_size == len(ranks) + 1
    text = "def f(x):\n    return x  # naïve 日本 <|endoftext|>\n"
    ids = bpe.encode(text)
    assert ids.dtype == np.int32 and bpe.eot_id not in ids
    assert 256 + merges.index(b"def") in ids and 256 + merges.index(b"return") in ids
    assert bpe.decode(ids) == text and bpe.decode([bpe.eot_id]) == gd.EOT
    # the ranks are read afresh each time: no stale on-disk cache keyed by path
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks[:256])))
    assert gd.load_tokenizer(str(path)).eot_id == 256


@pytest.mark.parametrize("package, name", [("tiktoken", "r.tiktoken"), ("tokenizers", "tokenizer.json")])
def test_missing_bpe_package_suggests_install(tmp_path, monkeypatch, package, name):
    (tmp_path / name).write_text("")
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(TitanaxError, match=package) as e:
        gd.load_tokenizer(str(tmp_path / name))
    assert e.value.suggestion == f"pip install {package}"
