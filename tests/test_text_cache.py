"""The text path: cut-context encoding equals the full context; the redundant feature shares the
texts' batch; the disk cache hits, misses, survives corruption and concurrent writers, evicts."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_vit, relative_error

import clip_surgery
from clip_surgery.cache import TextEmbeddingCache, default_directory, entry_key
from clip_surgery.text import DEFAULT_TEMPLATES, encode_tokens

TEXTS = ["a cat", "a very small red bicycle leaning on a wall", "tree"]


def _counting(tower, monkeypatch) -> list[tuple[int, int]]:
    """Record the shape of every token batch the text tower encodes."""
    calls: list[tuple[int, int]] = []
    original = tower.encode

    def encode(tokens):
        calls.append(tuple(tokens.shape))
        return original(tokens)

    monkeypatch.setattr(tower, "encode", encode)
    return calls


def _full_context(tower, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tower.encode(tokens).float()


@pytest.fixture(scope="module")
def vit():
    model = clip_surgery.wrap(make_vit(5, layers=2))
    model.cache_dir = None
    return model


def test_cut_context_equals_full_context_open_clip(vit):
    tower = vit.backbone.text
    prompts = [t.format(x) for x in TEXTS for t in DEFAULT_TEMPLATES[:20]] + [""]
    tokens = tower.tokenize(prompts)
    assert tower.prompt_lengths(tokens).max() < tokens.shape[1] / 3  # really cut
    with torch.no_grad():
        cut = encode_tokens(tower, tokens, vit.device, batch=7)
    assert relative_error(cut, _full_context(tower, tokens)) <= 1e-5


def test_cut_context_equals_full_context_transformers():
    from test_hf import make_hf

    model = clip_surgery.wrap(make_hf(4))
    tower = model.backbone.text
    prompts = [t.format(x) for x in TEXTS for t in DEFAULT_TEMPLATES[:10]]
    tokens = tower.tokenize(prompts)
    assert int(tower.prompt_lengths(tokens).max()) < tokens.shape[1]
    with torch.no_grad():
        cut = encode_tokens(tower, tokens, model.device, batch=8)
    assert relative_error(cut, _full_context(tower, tokens)) <= 1e-5


def test_groups_by_length_and_cuts_each_group(vit, monkeypatch):
    tower = vit.backbone.text
    calls = _counting(tower, monkeypatch)
    prompts = ["x"] * 4 + ["a b c d e f g h i j k l"] * 4
    with torch.no_grad():
        encode_tokens(tower, tower.tokenize(prompts), vit.device, batch=4)
    assert calls == [(4, 3), (4, 14)]  # short prompts together, each group cut at its longest


def test_redundant_feature_shares_the_texts_batch(monkeypatch):
    model = clip_surgery.wrap(make_vit(6, layers=2))
    model.cache_dir = None
    calls = _counting(model.backbone.text, monkeypatch)
    query = model.query(TEXTS, free_form=True)
    prompts = sum(count for count, _ in calls)
    assert prompts == 4 * len(DEFAULT_TEMPLATES)  # 3 texts and the empty string
    assert len(calls) == -(-prompts // 256)  # in shared batches of 256, none for "" alone
    expected = model.redundant_feature()
    assert torch.equal(query.redundant(), expected)
    assert len(calls) == -(-prompts // 256)  # the redundant feature came from the memory cache


# ----------------------------------------------------------------- disk cache


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "vit.pt"
    torch.save(make_vit(7, layers=2).state_dict(), path)
    return path


def _load(path: Path, cache: Path | None):
    model = clip_surgery.load(str(path), quick_gelu=True)
    model.cache_dir = cache
    return model


def test_disk_cache_hit_in_a_new_model_object(tmp_path, monkeypatch):
    path, cache = _checkpoint(tmp_path), tmp_path / "cache"
    first = _load(path, cache)
    expected = first.encode_text(TEXTS)
    assert len(list((cache / "text").glob("*/*.safetensors"))) == len(TEXTS)
    second = _load(path, cache)
    calls = _counting(second.backbone.text, monkeypatch)
    assert torch.equal(second.encode_text(TEXTS), expected)
    assert calls == []  # all three from disk
    second.encode_text(TEXTS, templates=["a photo of {}."])  # other templates: a miss
    assert len(calls) == 1


def test_disk_cache_keys_the_weights(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _load(_checkpoint(tmp_path), cache)
    first.encode_text(TEXTS)
    other = tmp_path / "other.pt"
    torch.save(make_vit(8, layers=2).state_dict(), other)
    second = _load(other, cache)
    calls = _counting(second.backbone.text, monkeypatch)
    second.encode_text(TEXTS)
    assert calls  # other weights: nothing reused
    assert first.weights_hash != second.weights_hash


def test_disk_cache_keys_what_the_tokenizer_produced(tmp_path, vit_model):
    def make(offset):
        return lambda prompts: torch.tensor([[49406, 320 + offset, 49407]] * len(prompts))

    first = clip_surgery.wrap(vit_model, tokenizer=make(0))  # same callable type, other ids
    second = clip_surgery.wrap(vit_model, tokenizer=make(1))
    for model in (first, second):
        model.cache_dir = tmp_path
    one, two = first.encode_text(["x"], templates=None), second.encode_text(["x"], templates=None)
    assert not torch.allclose(one, two)  # no collision through the disk cache
    third = clip_surgery.wrap(vit_model, tokenizer=make(1))
    third.cache_dir = tmp_path
    assert torch.equal(third.encode_text(["x"], templates=None), two)


def test_corrupt_and_foreign_entries_are_ignored_and_rewritten(tmp_path, monkeypatch):
    path, cache = _checkpoint(tmp_path), tmp_path / "cache"
    expected = _load(path, cache).encode_text(TEXTS)
    files = sorted((cache / "text").glob("*/*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:40])  # truncated
    files[1].write_bytes(files[2].read_bytes())  # another entry's content under this name
    model = _load(path, cache)
    calls = _counting(model.backbone.text, monkeypatch)
    assert relative_error(model.encode_text(TEXTS), expected) <= 1e-6
    assert sum(count for count, _ in calls) == 2 * len(DEFAULT_TEMPLATES)  # two recomputed
    again = _load(path, cache)
    calls = _counting(again.backbone.text, monkeypatch)
    again.encode_text(TEXTS)
    assert calls == []  # both rewritten correctly


def _writer(directory: str, seed: int) -> None:
    cache = TextEmbeddingCache(Path(directory))
    vectors = [(entry_key("w", i), np.full(64, float(i), np.float32)) for i in range(40)]
    for _ in range(5):
        cache.put(vectors[seed:] + vectors[:seed])


def test_concurrent_writers_leave_only_valid_entries(tmp_path):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_writer, args=(str(tmp_path), s)) for s in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    cache = TextEmbeddingCache(tmp_path)
    for i in range(40):
        assert np.array_equal(cache.get(entry_key("w", i)), np.full(64, float(i), np.float32))
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == []  # no temporary file left behind


def test_bounded_with_least_recently_used_eviction(tmp_path):
    cache = TextEmbeddingCache(tmp_path, max_bytes=12_000)  # room for about five entries
    for i in range(12):
        cache.put([(entry_key("e", i), np.zeros(512, np.float32))])
        used = 10**18 if i == 0 else (i + 1) * 10**9  # entry 0: the most recently used
        os.utime(cache._path(entry_key("e", i)), ns=(used, used))
    total = sum(p.stat().st_size for p in (tmp_path / "text").glob("*/*.safetensors"))
    assert total <= 12_000
    assert cache.get(entry_key("e", 0)) is not None  # recently used: kept
    assert cache.get(entry_key("e", 1)) is None  # oldest: evicted
    assert cache.get(entry_key("e", 11)) is not None  # newest: kept


def test_cache_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_SURGERY_CACHE", "off")
    assert default_directory() is None
    model = clip_surgery.load(str(_checkpoint(tmp_path)), quick_gelu=True)
    assert model.cache_dir is None
    model.encode_text(TEXTS)
    monkeypatch.setenv("CLIP_SURGERY_CACHE", str(tmp_path / "here"))
    assert default_directory() == tmp_path / "here"


def test_cli_cache_flags(tmp_path, vit_checkpoint):
    image = tmp_path / "a.png"
    from conftest import photo

    photo().save(image)
    base = [sys.executable, "-m", "clip_surgery.cli", "explain", str(image), "-t", "cat", "dog"]
    base += ["--checkpoint", vit_checkpoint, "--quick-gelu", "--no-progress"]
    cache = tmp_path / "cache"
    run = subprocess.run([*base, "--out", str(tmp_path / "o1"), "--cache-dir", str(cache)])
    assert run.returncode == 0
    assert len(list((cache / "text").glob("*/*.safetensors"))) == 2
    env = {**os.environ, "CLIP_SURGERY_CACHE": str(tmp_path / "env")}
    run = subprocess.run([*base, "--out", str(tmp_path / "o2"), "--no-cache"], env=env)
    assert run.returncode == 0 and not (tmp_path / "env").exists()
    (tmp_path / "file").write_text("x")
    run = subprocess.run(
        [*base, "--out", str(tmp_path / "o3"), "--cache-dir", str(tmp_path / "file")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
