"""The model with its fused paths switched on (Triton RoPE, norms with the residual add folded in,
cross entropy), run by Triton's CPU interpreter, equals the eager model in loss and every gradient;
on a GPU, the same with the compiled kernels and with each Sep-Attention kernel (flex, triton).

The interpreter must be enabled before Triton is imported, so the CPU comparison runs in a subprocess
(this file as a script)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {
    "llama": dict(norm="rmsnorm", activation="swiglu", gpt_j_residual=False, rotary_pct=1.0, num_kv_heads=2),
    "neox": dict(norm="layernorm", activation="gelu", gpt_j_residual=True, rotary_pct=0.5),
}


def compare(family: str, device: str = "cpu", impl: str = "reference", seq: int = 16) -> dict:
    """Loss and worst gradient difference: eager model with the reference attention vs the model with every
    fused flag on and attention ``impl``, fp32, on ``device``."""
    from megatron.config import config_from_tree
    from megatron.model import build_model

    def run(fused: bool):
        tree = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=seq, seed=3,
                    fused_rope=fused, fused_layernorm=fused, fused_cross_entropy=fused,
                    attention={"impl": impl if fused else "reference",
                               "sepllm": {"mode": "sepllm", "n_init": 1, "n_local": 4, "separator_ids": [1, 2]}},
                    **FAMILIES[family])
        torch.manual_seed(0)
        model = build_model(config_from_tree(tree), 64, [1, 2]).to(device)
        tokens = torch.randint(0, 64, (2, seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        return float(loss.detach()), {n: p.grad.cpu() for n, p in model.named_parameters()}

    (l_eager, g_eager), (l_fused, g_fused) = run(False), run(True)
    worst = max(float((g_eager[n] - g_fused[n]).abs().max() / (g_eager[n].abs().max() + 1e-12)) for n in g_eager)
    return {"loss_eager": l_eager, "loss_fused": l_fused, "worst_grad_rel": worst}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_model_matches_eager_in_interpreter(family):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, family], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(res["loss_eager"] - res["loss_fused"]) < 1e-5, res
    assert res["worst_grad_rel"] < 1e-4, res


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["reference", "flex", "triton"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_model_on_cuda_matches_eager(family, impl):
    res = compare(family, device="cuda", impl=impl, seq=200)
    assert abs(res["loss_eager"] - res["loss_fused"]) < 1e-4, res
    assert res["worst_grad_rel"] < 1e-3, res


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(compare(sys.argv[1])))
