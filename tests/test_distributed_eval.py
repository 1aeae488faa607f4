"""`vtprune eval` data-parallel under torchrun: 2 CPU processes (gloo) give the same per-sample
predictions, kept-token counts and accuracy as 1 process, and only rank 0 writes results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from vtprune.eval.distributed import Shard, launched_shard

ARGS = ["--model", "tiny-llava", "--method", "fastv", "--method", "cls", "--keep", "32", "--limit", "10",
        "--batch-size", "2", "--max-new-tokens", "2", "--log-samples", "--json"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run([*cmd, *ARGS, "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "results.json").read_text())


def _per_sample(res):
    return {(c["method"], p["index"]): (p["prediction"], p["kept"], p.get("kept_indices"))
            for c in [res["baseline"], *res["cells"]] for p in c["predictions"]}


def test_two_processes_match_one(tmp_path):
    _, one = _run([sys.executable, "-m", "vtprune.cli", "eval"], tmp_path / "one")
    stdout, two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), "-m", "vtprune.cli", "eval"], tmp_path / "two")
    assert json.loads(stdout) == two  # one JSON document on stdout: only rank 0 printed
    assert two["model"]["processes"] == 2 and one["model"]["processes"] == 1
    assert len(_per_sample(one)) == 30 and _per_sample(two) == _per_sample(one)
    for a, b in zip([one["baseline"], *one["cells"]], [two["baseline"], *two["cells"]]):
        assert (a["accuracy"], a["visual_tokens"], a["samples"]) == (b["accuracy"], b["visual_tokens"], b["samples"])
        assert b["timed_batches"] == a["timed_batches"] == 5  # every batch timed once, on some rank


def test_shards_split_batches_round_robin(monkeypatch):
    assert Shard(1, 3).batches(list(range(8))) == [1, 4, 7]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_shard() == Shard(2, 4, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched_shard() == Shard()
