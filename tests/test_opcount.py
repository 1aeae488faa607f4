"""`vtprune.eval.opcount`: exact op and would-be-sync counts, and attribution to vtprune or the model."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from conftest import batch, get_model

import vtprune
from vtprune.eval import opcount
from vtprune.eval.opcount import OpCounter, count_ops, count_prefill_decode
from vtprune.kernels import compact_torch

X = torch.arange(6.0)
MASK = X > 2


def _counts(fn):
    with OpCounter() as c:
        fn()
    return c.result()


# syncs: (case, expected op name recorded)
SYNCS = {
    "nonzero": (lambda: X.nonzero(), "aten::nonzero"),
    "bool_any": (lambda: bool(X.any()), "aten::_local_scalar_dense"),
    "item": (lambda: X.sum().item(), "aten::_local_scalar_dense"),
    "int": (lambda: int(X.sum()), "aten::_local_scalar_dense"),
    "tolist": (lambda: X.tolist(), "Tensor.tolist"),
    "cpu": (lambda: X.cpu(), "Tensor.cpu"),
    "numpy": (lambda: X.numpy(), "Tensor.numpy"),
    "asarray": (lambda: np.asarray(X), "Tensor.numpy"),
    "to_cpu_string": (lambda: X.to("cpu"), "Tensor.to(cpu)"),
    "bool_mask_index": (lambda: X[MASK], "aten::index.Tensor (bool mask)"),
    "bool_mask_put": (lambda: X.clone().__setitem__(MASK, 0.0), "aten::index_put_ (bool mask)"),
    "unique": (lambda: torch.unique(X), "aten::_unique2"),
    "masked_select": (lambda: X.masked_select(MASK), "aten::masked_select"),
    "repeat_interleave_tensor": (lambda: X.repeat_interleave(torch.full((6,), 2)), "aten::repeat_interleave.Tensor"),
    "where_one_arg": (lambda: torch.where(MASK), "aten::nonzero"),
}

NO_SYNCS = {
    "add": lambda: X + 1,
    "gather": lambda: X.gather(0, torch.zeros(2, dtype=torch.long)),
    "topk": lambda: torch.topk(X, 2),
    "long_index": lambda: X[torch.tensor([0, 2])],
    "masked_fill": lambda: X.masked_fill(MASK, 0.0),
    "repeat_interleave_sized": lambda: X.repeat_interleave(torch.full((6,), 2), output_size=12),
    "repeat_interleave_int": lambda: X.repeat_interleave(2),
    "to_dtype": lambda: X.to(torch.float64),
    "to_own_device": lambda: X.to(X.device),  # only with strict_to
    "nonzero_static": lambda: torch.nonzero_static(MASK, size=3),
}


@pytest.mark.parametrize("case", sorted(SYNCS))
def test_each_sync_counts_once(case):
    fn, name = SYNCS[case]
    r = _counts(fn)
    assert (r.vtprune_syncs, r.model_syncs) == (0, 1), r.model_sync_sites
    ((op, where),) = r.model_sync_sites
    assert op == name
    assert where.endswith(f"test_opcount.py:{fn.__code__.co_firstlineno}")  # the lambda's line


@pytest.mark.parametrize("case", sorted(NO_SYNCS))
def test_no_sync(case):
    r = _counts(NO_SYNCS[case])
    assert r.total_syncs == 0, r.model_sync_sites
    assert r.vtprune_ops == 0 and (r.total_ops >= 1 or case == "to_own_device")  # .to(own device): no op


def test_exact_op_counts():
    assert _counts(lambda: X + 1).total_ops == 1
    assert _counts(lambda: torch.topk(X, 2)).total_ops == 1
    assert _counts(lambda: X.nonzero()).total_ops == 1
    r = _counts(lambda: bool(X.any()))  # any + _local_scalar_dense
    assert (r.total_ops, r.model_syncs) == (2, 1)
    r = _counts(lambda: (X.tolist(), X.cpu()))  # wrapped methods: syncs, no dispatched op
    assert (r.total_ops, r.model_syncs) == (0, 2)


def test_strict_to_counts_device_objects():
    with OpCounter(strict_to=True) as c:
        X.to(X.device)
        X.to(torch.device("cpu"))
        X.to(torch.zeros(1))
        X.to(torch.float64)
    assert c.result().model_syncs == 3


def _temp_module(tmp_path, name: str, source: str):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_vtprune_function(source: str, name: str, env: dict):
    """A function whose code claims a file under the vtprune package (the file need not exist)."""
    filename = os.path.join(os.path.dirname(vtprune.__file__), "_opcount_test_fake.py")
    exec(compile(source, filename, "exec"), env)
    return env[name]


def test_temp_module_is_the_model(tmp_path):
    mod = _temp_module(tmp_path, "opcount_synthetic", "def f(x):\n    y = x + 1\n    return y.nonzero()\n")
    r = _counts(lambda: mod.f(X))
    assert (r.total_ops, r.vtprune_ops, r.vtprune_syncs, r.model_syncs) == (2, 0, 0, 1)
    ((op, where),) = r.model_sync_sites
    assert op == "aten::nonzero" and where.endswith("opcount_synthetic.py:3")


def test_vtprune_function_is_vtprune():
    x = torch.randn(2, 5, 3)
    index = torch.tensor([[0, 1], [2, 3]])
    r = _counts(lambda: compact_torch(x, index))
    assert r.total_ops > 0 and r.vtprune_ops == r.total_ops
    assert sum(r.vtprune_op_names.values()) == r.vtprune_ops


def test_linear_called_from_vtprune_code_is_vtprune(tmp_path):
    linear = torch.nn.Linear(3, 4)
    f = _fake_vtprune_function("def f(x):\n    return linear(x).nonzero()\n", "f", {"linear": linear})
    x = torch.randn(2, 3)
    with torch.no_grad():
        r = _counts(lambda: f(x))
    assert r.total_ops >= 2 and r.vtprune_ops == r.total_ops  # nn.Linear's ops (t, addmm) and nonzero
    assert (r.vtprune_syncs, r.model_syncs) == (1, 0)
    ((op, where),) = r.sync_sites
    assert op == "aten::nonzero" and where == "vtprune/_opcount_test_fake.py:2"


def test_model_code_under_a_vtprune_frame_is_the_model(tmp_path):
    mod = _temp_module(tmp_path, "opcount_layer", "def layer(x):\n    return (x * 2).nonzero()\n")
    hook = _fake_vtprune_function("def hook(x):\n    y = layer(x)\n    return y.cpu()\n", "hook", {"layer": mod.layer})
    r = _counts(lambda: hook(X))
    assert (r.total_ops, r.vtprune_ops) == (2, 0)  # mul and nonzero run in the model's file
    assert (r.vtprune_syncs, r.model_syncs) == (1, 1)  # .cpu() in the hook, nonzero in the layer
    assert [op for op, _ in r.sync_sites] == ["Tensor.cpu"]


def test_wrappers_restored_and_exceptions_propagate():
    originals = {m: torch.Tensor.__dict__.get(m) for m in ("tolist", "cpu", "numpy", "to")}
    with pytest.raises(ValueError, match="boom"), OpCounter():
        assert torch.Tensor.cpu is not originals["cpu"]
        raise ValueError("boom")
    assert {m: torch.Tensor.__dict__.get(m) for m in originals} == originals
    assert not opcount._ACTIVE
    assert torch.utils._python_dispatch._get_current_dispatch_mode() is None


def test_take_paused_and_nesting():
    with OpCounter() as outer:
        X.nonzero()
        first = outer.take()
        with outer.paused():
            X.nonzero()
        with OpCounter() as inner:
            X.tolist()
        X + 1
    assert (first.total_ops, first.model_syncs) == (1, 1)
    rest = outer.result()
    assert (rest.total_ops, rest.model_syncs) == (1, 1)  # the add, and tolist seen by both counters
    assert inner.result().model_syncs == 1 and inner.result().total_ops == 0
    out, r = count_ops(lambda t: t.nonzero(), X)
    assert out.shape == (5, 1) and r.model_syncs == 1
    assert (first + rest).total_ops == 2


def test_prefill_decode_unpatched_and_patched(processor):
    model = get_model("llava")
    inputs = batch(processor, [1])
    plain = count_prefill_decode(model, inputs, decode_steps=2)
    assert len(plain.decode) == 2 and plain.sequences.shape[1] == inputs["input_ids"].shape[1] + 3
    assert plain.prefill.vtprune_ops == 0 and plain.decode_total.vtprune_ops == 0
    assert plain.prefill.total_ops > 0 and plain.decode_mean("total_ops") > 0
    vtprune.apply(model, method="fastv", keep=16)
    try:
        pruned = count_prefill_decode(model, inputs, decode_steps=2)
    finally:
        vtprune.remove(model)
    assert pruned.prefill.vtprune_ops > 0
    assert pruned.prefill.model_ops > 0
    d = pruned.as_dict()
    assert d["decode_steps"] == 2 and d["prefill_vtprune_ops"] == pruned.prefill.vtprune_ops
    print(pruned.prefill.format_sites(), file=sys.stderr)


def test_device_provenance_counts_only_reads_of_device_tensors():
    """With ``track``: ops and reads of host tensors (factories, host copies) are free; reads of device
    tensors (roots and whatever derives from them) are syncs and their ops are counted."""
    dev = torch.arange(6.0)
    with OpCounter(track=dev) as c:
        host = torch.arange(6.0)
        host.nonzero(), bool(host.any()), host.tolist()  # host work: not counted at all
        derived = dev * 2
        derived.nonzero()  # a device read (the test's own code: the model's)
        compact_torch(derived[None, :, None], torch.tensor([[0, 2]]))  # vtprune's ops on device data
        derived.tolist()
    r = c.result()
    assert r.model_syncs == 2 and r.vtprune_syncs == 0, r.format_sites("model")
    assert r.vtprune_ops > 0
    assert r.total_ops - r.vtprune_ops == 2 + 2  # mul, nonzero, and the slicing views of derived[None, :, None]
