"""`gptlab prepare` and the token data directory: exact round trips, the split rule, shards, batches, bad input."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from gptlab import data as data_mod
from gptlab.cli import main
from gptlab.corpus import iter_pieces, expand_inputs
from gptlab.data import PretrainBatches, TokenData, eval_batches, prepare
from gptlab.errors import DataError
from gptlab.tokenizer import CharTokenizer, load_tokenizer

EOT = "<|endoftext|>"


def decode_split(d: TokenData, split: str) -> str:
    tok = d.tokenizer()
    ids = d.split(split)[:]
    return tok.decode(ids.tolist()) if len(ids) else ""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def expected_text_split(text: str, f: float = 0.1) -> tuple[str, str]:
    """The documented rule: cut after the first newline at or after byte int(n * (1 - f))."""
    raw = text.encode()
    mark = int(len(raw) * (1 - f))
    k = raw.find(b"\n", max(mark - 1, 0))
    k = len(raw) if k < 0 else k + 1
    return raw[:k].decode(), raw[k:].decode()


def test_single_text_file_round_trip_and_nanogpt_split(tmp_path, shakespeare_text):
    text = shakespeare_text[:300_000]
    src = write(tmp_path / "in.txt", text)
    meta = prepare([src], "char", tmp_path / "d", progress=False)
    d = TokenData(tmp_path / "d")
    head, tail = expected_text_split(text)
    assert decode_split(d, "train") == head + EOT
    assert decode_split(d, "val") == tail + EOT
    assert abs(len(head) - int(len(text) * 0.9)) < 200  # nanoGPT: first 90% / last 10%
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(set(text)) + 10  # specials and <|unk|>
    assert meta["splits"]["train"]["bytes"] == len(head.encode())
    assert d.bytes_per_token("val") == pytest.approx(len(tail.encode()) / (len(tail) + 1))
    assert meta["inputs"][0]["sha256"] == __import__("hashlib").sha256(text.encode()).hexdigest()
    d.verify()


texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=300)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(texts.filter(lambda t: t.strip()), min_size=1, max_size=4),
       f=st.sampled_from([0.0, 0.1, 0.5]))
def test_text_files_round_trip_exactly(tmp_path_factory, docs, f):
    tmp = tmp_path_factory.mktemp("rt")
    paths = [write(tmp / f"{i:02d}.txt", t) for i, t in enumerate(docs)]
    train, val = "", ""
    for t in docs:
        head, tail = expected_text_split(t, f) if f else (t, "")
        train += head + EOT if head else ""
        val += tail + EOT if tail else ""
    if f and not val:  # every cut fell at the end: an empty val split is refused, not written
        with pytest.raises(DataError, match="validation split is empty"):
            prepare(paths, "char", tmp / "d", val_fraction=f, progress=False)
        return
    prepare(paths, "char", tmp / "d", val_fraction=f, progress=False)
    d = TokenData(tmp / "d")
    assert decode_split(d, "train") == train
    assert decode_split(d, "val") == val


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(texts, min_size=1, max_size=30))
def test_jsonl_records_round_trip_with_a_seeded_split(tmp_path_factory, records):
    tmp = tmp_path_factory.mktemp("jl")
    lines = "".join(json.dumps({"body": r, "id": i}) + "\n" for i, r in enumerate(records))
    src = write(tmp / "in.jsonl", lines)
    prepare([src], "char", tmp / "d", val_fraction=0.0, text_field="body", progress=False)
    d = TokenData(tmp / "d")
    assert decode_split(d, "train") == "".join(r + EOT for r in records)
    assert d.meta["splits"]["train"]["documents"] == len(records)


def test_jsonl_split_is_deterministic_and_seeded(tmp_path):
    records = [f"record number {i}\n" for i in range(400)]
    src = write(tmp_path / "in.jsonl", "".join(json.dumps({"text": r}) + "\n" for r in records))
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare([src], "char", tmp_path / name, seed=seed, progress=False)
        d = TokenData(tmp_path / name)
        runs[name] = decode_split(d, "val")
    assert runs["a"] == runs["b"] != runs["c"]
    val_docs = runs["a"].count(EOT)
    assert 20 <= val_docs <= 65  # ~10% of 400
    train = decode_split(TokenData(tmp_path / "a"), "train")
    assert sorted(x for x in (train + runs["a"]).split(EOT) if x) == sorted(records)


def test_gzip_directories_and_globs(tmp_path, shakespeare_files):
    a = Path(shakespeare_files[0]).read_text(encoding="utf-8")[:50_000]
    b = Path(shakespeare_files[1]).read_text(encoding="utf-8")[:50_000]
    write(tmp_path / "corpus" / "a.txt", a)
    (tmp_path / "corpus" / "sub").mkdir()
    with gzip.open(tmp_path / "corpus" / "sub" / "b.txt.gz", "wt", encoding="utf-8", newline="") as fh:
        fh.write(b)
    write(tmp_path / "corpus" / "notes.bin", "ignored in directories")
    write(tmp_path / "corpus" / ".hidden" / "x.txt", "hidden files are skipped")
    write(tmp_path / "plain" / "a.txt", a)
    write(tmp_path / "plain" / "b.txt", b)
    assert [Path(s.path).name for s in expand_inputs([tmp_path / "corpus"])] == ["a.txt", "b.txt.gz"]
    prepare([tmp_path / "corpus"], "char", tmp_path / "from-dir", progress=False)
    prepare([str(tmp_path / "plain" / "*.txt")], "char", tmp_path / "from-glob", progress=False)
    x, y = TokenData(tmp_path / "from-dir"), TokenData(tmp_path / "from-glob")
    for split in ("train", "val"):
        assert decode_split(x, split) == decode_split(y, split)
    assert x.meta["inputs"][1]["sha256"] != y.meta["inputs"][1]["sha256"]  # the raw (compressed) bytes


def test_gpt2_tokenizer_matches_encoding_the_text_directly(tmp_path, gpt2_ranks_path, shakespeare_text):
    text = shakespeare_text[:200_000]
    src = write(tmp_path / "in.txt", text)
    prepare([src], str(gpt2_ranks_path), tmp_path / "d", progress=False)
    d = TokenData(tmp_path / "d")
    tok = load_tokenizer(str(gpt2_ranks_path))
    head, tail = expected_text_split(text)
    assert d.split("train")[:].tolist() == tok.encode(head) + [50256]
    assert d.split("val")[:].tolist() == tok.encode(tail) + [50256]
    assert d.meta["dtype"] == "uint16" and d.meta["eos_id"] == 50256
    # the data directory carries its own tokenizer
    assert d.tokenizer().encode("Hello world") == tok.encode("Hello world")


def test_worker_pool_and_shards_give_the_same_tokens(tmp_path, shakespeare_files, monkeypatch):
    files = shakespeare_files[:3]
    prepare(files, "char", tmp_path / "one", workers=1, progress=False)
    monkeypatch.setattr(data_mod, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(data_mod, "_BATCH_BYTES", 1 << 16)
    prepare(files, "char", tmp_path / "pool", workers=2, shard_tokens=100_000, progress=False)
    one, pool = TokenData(tmp_path / "one"), TokenData(tmp_path / "pool")
    assert len(pool.meta["splits"]["train"]["shards"]) > 3
    for split in ("train", "val"):
        assert np.array_equal(one.split(split)[:], pool.split(split)[:])
    # windows that cross shard boundaries read the same as the flat array
    flat, sharded = one.split("train")[:], pool.split("train")
    for start in (0, 99_990, 100_000, 199_999, len(flat) - 65):
        assert np.array_equal(sharded.window(start, 65), flat[start:start + 65])


def test_train_tokenizer_and_dtypes(tmp_path, shakespeare_text):
    src = write(tmp_path / "in.txt", shakespeare_text[:400_000])
    assert main(["prepare", "--input", str(src), "--train-tokenizer", "--vocab-size", "600",
                 "--out", str(tmp_path / "bpe")]) == 0
    d = TokenData(tmp_path / "bpe")
    assert d.meta["vocab_size"] == 600 and d.meta["tokenizer"] == "bpe:600"
    assert decode_split(d, "val").endswith(EOT) and len(d.split("train")) < 400_000 * 0.9 / 1.5
    prepare([src], str(tmp_path / "bpe" / "tokenizer"), tmp_path / "u32", dtype="uint32", progress=False)
    u32 = TokenData(tmp_path / "u32")
    assert u32.meta["dtype"] == "uint32" and np.array_equal(u32.split("val")[:], d.split("val")[:])


def test_vocabulary_beyond_uint16(tmp_path):
    chars = ["\n"] + [chr(c) for c in range(0x10000, 0x10000 + 70_000)]  # planes 1 and 2: no surrogates
    tok = CharTokenizer(chars)
    text = "".join(chars[i] for i in (1, 65_535, 65_536, 70_000)) + "\n" + "\U00020000\U0001F600\n"
    src = write(tmp_path / "in.txt", text)
    with pytest.raises(DataError, match="too many for uint16"):
        prepare([src], tok, tmp_path / "u16", dtype="uint16", progress=False)
    assert not (tmp_path / "u16").exists()
    meta = prepare([src], tok, tmp_path / "auto", val_fraction=0.0, progress=False)
    assert meta["dtype"] == "uint32"
    ids = TokenData(tmp_path / "auto").split("train")[:]
    assert ids.max() >= 69_999 and decode_split(TokenData(tmp_path / "auto"), "train") == text + EOT


def test_pretrain_batches_are_stateless_and_sliced_by_rank(tmp_path, shakespeare_text):
    src = write(tmp_path / "in.txt", shakespeare_text[:50_000])
    prepare([src], "char", tmp_path / "d", progress=False)
    tokens = TokenData(tmp_path / "d").split("train")
    flat = torch.from_numpy(tokens[:])
    full = PretrainBatches(tokens, 8, 32, seed=5)
    x, y = full.get(3, 1)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, s in zip(x, full.starts(3, 1)):
        assert torch.equal(row, flat[s:s + 32])
    assert torch.equal(PretrainBatches(tokens, 8, 32, seed=5).get(3, 1)[0], x)  # same arguments, same batch
    assert not torch.equal(full.get(3, 0)[0], x) and not torch.equal(full.get(4, 1)[0], x)
    ranks = [PretrainBatches(tokens, 4, 32, seed=5, rank=r, world_size=2).get(3, 1)[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), x)


def test_eval_batches_cover_the_split_in_order(tmp_path, shakespeare_text):
    src = write(tmp_path / "in.txt", shakespeare_text[:20_000])
    prepare([src], "char", tmp_path / "d", progress=False)
    val = TokenData(tmp_path / "d").split("val")
    flat = torch.from_numpy(val[:])
    batches = list(eval_batches(val, 4, 50))
    xs = torch.cat([x for x, _ in batches])
    assert len(xs) == (len(val) - 1) // 50
    assert torch.equal(xs.reshape(-1), flat[:len(xs) * 50])
    assert len(list(eval_batches(val, 4, 50, max_batches=2))) == 2
    with pytest.raises(DataError, match="fewer than block_size"):
        PretrainBatches(val, 2, len(val), seed=0)


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"   \n\n", "empty"),
    (b"text\x00more", r"in\.txt:1: binary data \(NUL byte at offset 4\)"),
    (b"line one\nline two \xff\xfe\n", r"in\.txt:2: not UTF-8 text"),
])
def test_bad_text_files(tmp_path, content, match):
    src = tmp_path / "in.txt"
    src.write_bytes(content)
    with pytest.raises(DataError, match=match):
        prepare([src], "char", tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.tmp-*"))


def test_bad_jsonl_names_file_and_line(tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", '{"text": "fine"}\n\n{"body": "no text field"}\n')
    assert main(["prepare", "--input", str(src), "--tokenizer", "char", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in.jsonl:3: no 'text' field; set --text-field" in err
    write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        prepare([tmp_path / "bad.jsonl"], "char", tmp_path / "d", progress=False)


def test_existing_output_is_never_touched(tmp_path, shakespeare_text):
    src = write(tmp_path / "in.txt", shakespeare_text[:5000])
    out = tmp_path / "d"
    prepare([src], "char", out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(DataError, match="already exists"):
        prepare([src], "char", out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_missing_inputs_and_corrupted_data_dirs(tmp_path, shakespeare_text):
    with pytest.raises(DataError, match="input not found"):
        prepare([tmp_path / "nope.txt"], "char", tmp_path / "d", progress=False)
    with pytest.raises(DataError, match="matches no files"):
        prepare([str(tmp_path / "*.txt")], "char", tmp_path / "d", progress=False)
    with pytest.raises(DataError, match="does not exist; create it with `gptlab prepare"):
        TokenData(tmp_path / "d")
    src = write(tmp_path / "in.txt", shakespeare_text[:5000])
    prepare([src], "char", tmp_path / "d", progress=False)
    shard = tmp_path / "d" / "train-00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match="train-00000.bin: missing or truncated"):
        TokenData(tmp_path / "d").split("train")
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(DataError, match="sha256 does not match meta.json"):
        TokenData(tmp_path / "d").verify()


def test_pieces_split_a_document_once(tmp_path):
    src = write(tmp_path / "t.txt", "".join(f"line {i}\n" for i in range(100_000)))
    pieces = list(iter_pieces(expand_inputs([src])))
    assert [p.split for p in pieces if p.doc_end] == ["train", "val"]
    assert "".join(p.text for p in pieces) == src.read_text()
    assert len(pieces) > 2  # streamed in chunks, not read whole
    assert os.path.getsize(src) > data_mod._BATCH_BYTES


def test_hugging_face_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets; CI has it")
    rows = [f"row {i}: {'word ' * (i % 7)}\n" for i in range(300)]
    datasets.Dataset.from_dict({"content": rows, "n": list(range(300))}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="no text field 'text'; set --text-field"):
        prepare([tmp_path / "ds"], "char", tmp_path / "bad", progress=False)
    prepare([tmp_path / "ds"], "char", tmp_path / "d", text_field="content", progress=False)
    d = TokenData(tmp_path / "d")
    assert d.meta["inputs"][0]["kind"] == "hf"
    both = decode_split(d, "train") + decode_split(d, "val")
    assert sorted(x for x in both.split(EOT) if x) == sorted(rows)
    assert 10 <= d.meta["splits"]["val"]["documents"] <= 55
