"""Every back-end follows one contract: the ops of ``functional.OPS``, each with the signature of
the ``functional`` function of that name without ``impl``; and ``functional`` only dispatches."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from scvi_fast import functional


def _shape(sig: inspect.Signature) -> list[tuple]:
    """Names, kinds and defaults of the parameters (annotations are each module's own)."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", sorted(functional.BACKENDS))
def test_every_backend_exposes_every_op_with_its_signature(name):
    # importing a back-end package needs neither Triton nor the compiled extension
    mod = importlib.import_module(functional.BACKENDS[name])
    assert callable(mod.is_available) and callable(mod.unavailable_reason)
    for op in functional.OPS:
        fn = getattr(mod, op, None)
        assert callable(fn), f"back-end {name!r} has no op {op!r}"
        assert _shape(inspect.signature(fn)) == _shape(functional.op_signature(op)), (
            f"{name}.{op}{inspect.signature(fn)} differs from the contract "
            f"{functional.op_signature(op)}"
        )


def test_functional_ops_are_the_contract():
    """The contract is the functional API: every op there takes ``impl`` and nothing else
    beyond the back-ends' arguments."""
    for op in functional.OPS:
        params = inspect.signature(getattr(functional, op)).parameters
        assert "impl" in params and params["impl"].default == "auto"
        assert [p for p in params if p != "impl"] == list(functional.op_signature(op).parameters)
    with pytest.raises(ValueError, match="op must be one of"):
        functional.op_signature("sparse_linear_v2")


@pytest.mark.parametrize("op", functional.OPS)
def test_functional_dispatches_to_the_resolved_backend(op, monkeypatch):
    """Each functional op calls ``backend(resolve_impl(impl, device)).<op>`` with its arguments
    (positional as in the contract; ``method`` by name), whatever the back-end."""
    calls = []

    class Recorder:
        def __getattr__(self, attr):
            def record(*args, **kwargs):
                calls.append((attr, len(args), sorted(kwargs)))
                return "result"
            return record

    seen = []
    monkeypatch.setattr(functional, "backend", lambda which: seen.append(which) or Recorder())
    t = torch.zeros(2, 3)
    args = {
        "sparse_linear": (t, t, t, t, None),
        "nb_softmax_loglik": (t, t, t, (t, t, t)),
        "nb_softmax_loglik_linear": (t, t, None, t, t, (t, t, t)),
        "zinb_softmax_loglik": (t, t, t, t, (t, t, t)),
        "poisson_softmax_loglik": (t, t, (t, t, t)),
        "reparam_kl": (t, t, t),
        "dropout": (t, 0.5),
    }[op]
    for impl in ("torch", "native", "triton"):
        assert getattr(functional, op)(*args, impl=impl) == "result"
    assert seen == ["torch", "native", "triton"]
    n_params = len(functional.op_signature(op).parameters)
    for attr, n_args, kwargs in calls:
        assert attr == op
        assert n_args + len(kwargs) == n_params  # every argument passed on, defaults included


def test_backend_lookup_and_unknown_impl():
    assert functional.backend("torch") is importlib.import_module("scvi_fast.reference")
    assert functional.resolve_impl("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        functional.resolve_impl("cuda", "cpu")
