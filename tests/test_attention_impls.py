"""Every capability attention/impls.py declares for a kernel, checked against the kernel: a declared
"no" is refused at validation (one line), a declared "yes" runs on CPU and matches the dense
reference (reference.py) on the same inputs. Kernels that need CUDA (triton, flash) are checked for
the refusal only; their "yes" runs in the GPU tests."""
from __future__ import annotations

import pytest
import torch
from test_context_parallel_math import simulate_sep
from test_sep_attention import make_inputs, random_documents, random_separators, rel_err

from megatron.attention.alibi import AlibiBias, alibi_slopes
from megatron.attention.blockwise import blocks_forward, placed
from megatron.attention.context_parallel import sequence_segments, take_segments
from megatron.attention.dispatch import attend
from megatron.attention.impls import KERNELS, resolve_auto
from megatron.attention.reference import reference_attention
from megatron.attention.sepllm_rule import SepRule
from megatron.config import config_from_tree
from megatron.config.validation import validate_context_parallel, validate_device
from megatron.errors import ConfigError

CAPABILITIES = ("dropout", "alibi", "alibi_bipe", "separate_documents", "context_parallel")
B, HQ, HKV, L, D = 2, 4, 2, 32, 8
TOL = 1e-4


def tree(impl: str, capability: str) -> dict:
    """A config asking ``impl`` for ``capability`` on its Sep-Attention layers."""
    t = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, seq_length=32,
             attention={"impl": impl, "sepllm": {"mode": "sepllm", "n_init": 2, "n_local": 4}})
    if capability == "dropout":
        t["attention_dropout"] = 0.1
    elif capability == "alibi":
        t["pos_emb"] = "alibi"
    elif capability == "alibi_bipe":
        t.update(pos_emb="alibi", bipe=True)
    elif capability == "separate_documents":
        t["attention"]["sepllm"]["separate_documents"] = True
    elif capability == "context_parallel":
        t["context_parallel_size"] = 2
    return t


def refused(impl: str, capability: str) -> str:
    """The validation error for the config asking ``impl`` for ``capability`` ('' when accepted)."""
    try:
        cfg = config_from_tree(tree(impl, capability), log=lambda m: None)
        if capability == "context_parallel":
            validate_context_parallel(cfg)
            validate_device(cfg, "cpu")
    except ConfigError as err:
        return str(err)
    return ""


def inputs():
    q, k, v, _ = make_inputs(B, HQ, HKV, L, D)
    is_sep = random_separators(B, L, 0.2)
    return q, k, v, is_sep


def oracle_rule(impl: str, **kw) -> SepRule:
    """The rule the kernel applies: Sep-Attention, or dense causal for the baselines."""
    return SepRule("sepllm", 2, 4, **kw) if KERNELS[impl].applies_rule else SepRule("full", **kw)


def ring_forward(q, k, v, cp: int) -> torch.Tensor:
    """Every cp rank's ring-attention output (full causal layers under context parallelism), in order."""
    segs = [placed(sequence_segments(L, cp, r)) for r in range(cp)]
    chunk = [lambda x, r=r: take_segments(x, sequence_segments(L, cp, r), 2) for r in range(cp)]
    full = torch.zeros_like(q)
    for r in range(cp):
        out = torch.zeros_like(chunk[r](q))
        lse = torch.full(out.shape[:3], float("-inf"))
        for step in range(cp):
            j = (r - step) % cp
            blocks_forward(chunk[r](q), chunk[j](k), chunk[j](v), segs[r], segs[j], None, D ** -0.5, out, lse)
        for a, b, off in segs[r]:
            full[:, :, a:b] = out[:, :, off:off + b - a]
    return full


def runs_like_reference(impl: str, capability: str) -> None:
    q, k, v, is_sep = inputs()
    slopes = torch.tensor(alibi_slopes(HQ))
    if capability == "context_parallel":
        rule = oracle_rule(impl)
        if rule.is_full:
            got = ring_forward(q, k, v, cp=2)
        else:
            cp_impl = resolve_auto("cpu", False) if impl == "auto" else impl
            got = simulate_sep(q, k, v, is_sep, rule, None, 2, cp_impl)[0]
        want = reference_attention(q, k, v, is_sep, rule)
    elif capability == "dropout":
        rule = oracle_rule(impl)
        torch.manual_seed(0)
        got = attend(q, k, v, is_sep, rule, impl=impl, dropout_p=0.3)
        torch.manual_seed(0)
        want = reference_attention(q, k, v, is_sep, rule, dropout_p=0.3)
        assert not torch.allclose(got, attend(q, k, v, is_sep, rule, impl=impl))  # dropout did something
    else:
        docs = random_documents(B, L, 10) if capability == "separate_documents" else None
        rule = oracle_rule(impl, separate_documents=docs is not None)
        bias = None
        if capability.startswith("alibi"):
            segments = torch.cumsum(is_sep.long(), dim=1) if capability == "alibi_bipe" else None
            bias = AlibiBias(slopes, segments)
        got = attend(q, k, v, is_sep, rule, docs, impl=impl, bias=bias)
        want = reference_attention(q, k, v, is_sep, rule, docs, bias=bias)
    assert rel_err(got, want) <= TOL, f"{impl} {capability}: rel err {rel_err(got, want):.2e}"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("impl", list(KERNELS))
def test_declared_capability_matches_behaviour(impl, capability):
    spec = KERNELS[impl]
    declared = getattr(spec, capability)
    declared = "cpu" in declared if capability == "context_parallel" else declared
    problem = refused(impl, capability)
    if not declared:
        assert problem and "\n" not in problem and impl in problem, problem
        return
    assert problem == ""
    if "cpu" in spec.devices:
        runs_like_reference(impl, capability)


def test_flash_with_separate_documents_fails_at_validation_with_one_line():
    problem = refused("flash", "separate_documents")
    assert "attention.impl 'flash' does not implement attention.sepllm.separate_documents" in problem
    assert "\n" not in problem


@pytest.mark.parametrize("impl", list(KERNELS))
def test_declared_devices_are_what_validation_accepts(impl):
    cfg = config_from_tree(tree(impl, "nothing"), log=lambda m: None)
    spec = KERNELS[impl]
    for device in ("cpu", "cuda"):
        if device in spec.devices or (device == "cpu" and spec.interpreter):
            validate_device(cfg, device, triton_interpreter=spec.interpreter)
        else:
            with pytest.raises(ConfigError, match=f"attention.impl '{impl}' needs"):
                validate_device(cfg, device)


def test_auto_resolves_as_declared():
    assert resolve_auto("cpu", True) == "compact"
    assert resolve_auto("cuda", False) == "flex"
    assert resolve_auto("cuda", True) == "triton"
    assert resolve_auto("cuda", True, alibi=True) == "flex"  # the triton kernels take no ALiBi
    for capability in ("dropout", "alibi", "alibi_bipe", "separate_documents"):
        # auto declares what every kernel it can resolve to (for its inputs) has
        may_run = [KERNELS["compact"], KERNELS["flex"]]
        may_run += [] if capability.startswith("alibi") else [KERNELS["triton"]]
        assert getattr(KERNELS["auto"], capability) == all(getattr(s, capability) for s in may_run), capability
