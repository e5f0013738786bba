"""Reliability of the core's files and caches: atomic writes, file modes, weights-only loads,
stage keys that change with every input, and runs that share a cache without racing."""
from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import random
import stat
import time

import pytest
import torch

from energyflow.errors import CorruptFileError, InputError, UnsafeFileError
from energyflow.files import (append_jsonl, atomic_torch_save, check_writable, load_torch, read_json, read_jsonl,
                              write_json)
from energyflow.stages import Stage, config_key, fingerprint


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_writes_get_the_usual_mode(tmp_path):
    write_json({"a": 1}, tmp_path / "x.json")
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "x.pt")
    for name in ("x.json", "x.pt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~_umask()
    assert sorted(os.listdir(tmp_path)) == ["x.json", "x.pt"]  # no temporary files left


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, fault):
    path = tmp_path / "results.json"
    write_json({"old": True}, path)

    def fail(fd):
        raise fault

    monkeypatch.setattr("energyflow.files.os.fsync", fail)
    with pytest.raises(type(fault)):
        write_json({"new": True}, path)
    with pytest.raises(type(fault)):
        atomic_torch_save({"new": torch.ones(3)}, tmp_path / "results.json")
    assert read_json(path) == {"old": True}
    assert os.listdir(tmp_path) == ["results.json"]


class _Exploit:
    """Unpickling this would create a marker file (what a crafted model file could do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "payload": _Exploit(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeFileError, match="refusing to load model file"):
        load_torch(path, what="model file")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage that is not a torch file", "truncate"])
def test_empty_truncated_or_garbage_torch_files_name_the_file(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    if content == "truncate":
        atomic_torch_save({"w": torch.randn(1000)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CorruptFileError, match="checkpoint.pt"):
        load_torch(path, what="trainer checkpoint")
    with pytest.raises(InputError, match="not found"):
        load_torch(tmp_path / "missing.pt")


def test_json_readers_name_the_file_and_line(tmp_path):
    (tmp_path / "done.json").write_text('{"finished": ')
    with pytest.raises(CorruptFileError, match="done.json"):
        read_json(tmp_path / "done.json")
    append_jsonl(tmp_path / "r.jsonl", {"round": 0})
    append_jsonl(tmp_path / "r.jsonl", {"round": 1})
    assert read_jsonl(tmp_path / "r.jsonl") == [{"round": 0}, {"round": 1}]
    with open(tmp_path / "r.jsonl", "a") as f:
        f.write('{"round": 2, "sco')
    with pytest.raises(CorruptFileError, match="r.jsonl line 3"):
        read_jsonl(tmp_path / "r.jsonl")


def test_check_writable_fails_fast(tmp_path, monkeypatch):
    check_writable(tmp_path / "new")

    def deny(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("energyflow.files.tempfile.mkstemp", deny)
    with pytest.raises(InputError, match="cannot write to run directory .*Permission denied"):
        check_writable(tmp_path, "run directory")


# -- stage keys -------------------------------------------------------------------------------------
def _random_config(rng: random.Random, depth: int = 0):
    config = {}
    for i in range(rng.randint(2, 5)):
        kind = rng.choice(["int", "float", "str", "bool", "none", "list"] + (["dict"] if depth < 2 else []))
        config[f"k{i}"] = {"int": lambda: rng.randint(-5, 5), "float": lambda: rng.uniform(-1, 1),
                           "str": lambda: rng.choice(["ot", "vp", "a b"]), "bool": lambda: rng.random() < 0.5,
                           "none": lambda: None, "list": lambda: [rng.randint(0, 3) for _ in range(3)],
                           "dict": lambda: _random_config(rng, depth + 1)}[kind]()
    return config


def _leaves(config, prefix=()):
    for k, v in config.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,)


def _mutated(config, where):
    import copy

    out = copy.deepcopy(config)
    node = out
    for k in where[:-1]:
        node = node[k]
    v = node[where[-1]]
    node[where[-1]] = ("changed" if v is None else not v if isinstance(v, bool) else v + [1] if isinstance(v, list)
                       else v + "!" if isinstance(v, str) else v + 1)
    return out


def test_changing_any_single_field_changes_the_key():
    rng = random.Random(0)
    for _ in range(200):
        config = _random_config(rng)
        key = config_key(config)
        assert config_key(dict(reversed(list(config.items())))) == key  # order does not matter
        for where in _leaves(config):
            assert config_key(_mutated(config, where)) != key, where
        assert config_key(config, upstream=["abc"]) != key


def test_data_fingerprints_follow_contents_not_names():
    a = torch.arange(12.0).reshape(3, 4)
    b = a.clone()
    assert fingerprint(a) == fingerprint(b)
    b[2, 3] += 1e-6
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) != fingerprint(a.reshape(4, 3)) != fingerprint(a.double())
    assert fingerprint(a, a) != fingerprint(a)


def test_unstable_objects_are_refused_in_keys():
    with pytest.raises(InputError, match=r"config\.energy"):
        config_key({"energy": object()})


# -- two runs sharing a cache ---------------------------------------------------------------------------
def _stage_worker(root: str, log: str) -> float:
    def work(out_dir: str) -> dict:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        write_json({"value": 7}, os.path.join(out_dir, "out.json"))
        return {"value": 7}

    stage = Stage("critic", {"alpha": 0.1}, root)
    summary = stage.run(work)
    return read_json(stage.file("out.json"))["value"] + summary["value"]


def test_two_runs_sharing_a_cache_train_each_stage_once(tmp_path):
    log = str(tmp_path / "calls.log")
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_stage_worker, [(str(tmp_path / "cache"), log)] * 2)
    assert results == [14, 14]
    assert len(open(log).read().split()) == 1  # trained once; the other run waited and read it


def test_a_corrupt_stage_marker_names_the_file(tmp_path):
    stage = Stage("behaviour", {"a": 1}, str(tmp_path))
    stage.finish({"x": 1})
    with open(os.path.join(stage.folder, "done.json"), "w") as f:
        f.write("")
    with pytest.raises(CorruptFileError, match="done.json.*delete"):
        _ = stage.summary
    json.dumps(stage.config)
