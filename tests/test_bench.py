"""`vtprune bench`: measurements, ratios and limits on tiny models (speed targets are checked by the
benchmark itself on the medium size, never here), the 7b shapes, and bad arguments."""

from __future__ import annotations

import json

import pytest
import torch

from vtprune.cli import main
from vtprune.eval import bench


@pytest.mark.parametrize(("arch", "method", "stage", "kept"), [
    ("llava", "fastv", "llm", 64), ("qwen2-vl", "cls", "pre-llm", 64),
    ("llava-next", "fastv", "llm", 64 + 38),  # the 500 x 400 image's 38 row newlines are never pruned
])
def test_bench_measures_both_ways_and_the_kv_cache_follows_the_dropped_tokens(arch, method, stage, kept):
    r = bench.run(arch=arch, size="tiny", method=method, keep=64, repeats=1, new_tokens=3)
    assert r["stage"] == stage and r["finite"]
    assert r["visual_tokens"]["after"] == [kept] and r["visual_tokens"]["before"][0] > 4 * kept
    assert r["flop_ratio"] > 1 and r["flops_prefill"]["pruned"] < r["flops_prefill"]["unpruned"]
    # exactly the dropped tokens leave the layers after the prune point
    assert r["kv_cache_bytes"]["pruned"] == pytest.approx(r["kv_cache_expected_bytes"], rel=1e-9)
    assert r["kv_cache_bytes"]["pruned"] < r["kv_cache_bytes"]["unpruned"]
    assert set(r["vtprune_ms"]) == {"plan", "score", "compact"} and all(v > 0 for v in r["vtprune_ms"].values())
    assert all(r["prefill_ms"][k] > 0 and r["e2e_ms"][k] > 0 for k in ("pruned", "unpruned"))
    text = bench.table(r)
    assert "(FLOPs)" in text and "KV-cache MiB" in text and "of the unpruned prefill" in text


def test_bench_cli_json_and_targets(capsys):
    assert main(["bench", "--arch", "llava", "--size", "tiny", "--method", "cls", "--keep", "32", "--repeats", "1",
                 "--new-tokens", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["method"] == "cls" and r["sequence"]["after"][0] == r["sequence"]["before"][0] - 576 + 32
    assert "targets" not in r  # targets apply to the medium LLaVA on the CPU at 64 tokens
    assert ("llava", "medium", "cpu", "fastv", 64) in bench.TARGETS


def test_bench_refuses_what_it_cannot_run(capsys):
    if not torch.cuda.is_available():
        assert main(["bench", "--size", "tiny", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["bench", "--size", "tiny", "--keep", "0"]) == 2
    assert "keep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--arch", "gpt2"])


@pytest.mark.parametrize(("arch", "billions"), [("llava", 7.06), ("qwen2-vl", 8.29), ("qwen2.5-vl", 8.29)])
def test_7b_shapes_have_the_real_parameter_counts(arch, billions):
    with torch.device("meta"):
        if arch == "llava":
            from vtprune.toy.tiny import tiny_llava

            model = tiny_llava(**bench._LLAVA["7b"])
        else:
            from vtprune.toy.tiny_qwen import tiny_qwen

            model = tiny_qwen(bench.QWEN_KIND[arch], **bench._QWEN["7b"], **bench._VISION_7B[arch])
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert n == pytest.approx(billions, abs=0.03)
