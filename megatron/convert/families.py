"""The HF model families we convert: GPT-NeoX/Pythia, Llama (incl. GQA), GPT-2, Falcon.

Each family knows (1) how an HF ``config.json`` maps to our model keys and back, and (2) the
per-layer tensor correspondence. Both directions walk the same table, so import and export cannot
drift apart. Weight layouts that need more than a rename:

* QKV: ours is one projection laid out per KV group as [q_1..q_r, k, v] x head_dim. HF GPT-NeoX's
  ``query_key_value`` is exactly that for r = 1; Llama has separate q/k/v_proj; GPT-2's ``c_attn``
  is [all q | all k | all v] and stored as a Conv1D ([in, out], transposed).
* Rotary: ours, HF GPT-NeoX and HF Llama all rotate the two halves of the first rotary_dim
  channels ("rotate-half"), so no permutation of q/k rows is needed.
* Vocab: ours is padded (make_vocab_size_divisible_by x TP); HF holds the real size.
* Falcon: ``query_key_value`` is our layout in all three of its variants (per head [q, k, v];
  multi-query [q_1..q_H, k, v]; new decoder architecture [q_1..q_r, k, v] per KV group). Its
  single-layernorm variants share one norm between attention and MLP: we hold two equal copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron.config.schema import Config
from megatron.convert.common import TensorSource, fuse_qkv, pad_rows, split_qkv
from megatron.errors import ConversionError
from megatron.model.transformer import ffn_size
from megatron.progress import Progress

# HF activation names -> ours. The tanh approximations differ from each other by float rounding only.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "relu": "relu"}
OUR_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
SUPPORTED = ("GPTNeoXForCausalLM (gpt_neox), LlamaForCausalLM (llama), GPT2LMHeadModel (gpt2), "
             "FalconForCausalLM (falcon)")


@dataclass
class Linear:
    ours: str
    hf: str
    out: int
    inp: int
    our_bias: bool
    hf_bias: bool
    conv1d: bool = False  # GPT-2 stores weights as [in, out]


@dataclass
class NormMap:
    ours: str
    hf: str
    size: int
    bias: bool
    shared: bool = False  # the HF norm is also read by the next NormMap (read it without consuming)


def rope_settings(hf: Dict[str, Any], default_partial: float) -> Tuple[float, float, str]:
    """(theta, partial rotary factor, rope type) from either transformers v5 ``rope_parameters``
    or the v4 spellings (``rope_theta``, ``rope_scaling``, ``rotary_pct``, ``rotary_emb_base``)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConversionError(f"config.json: 'rope_parameters' = {rope!r} is not a mapping")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConversionError("config.json: per-layer-type rope_parameters are not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default"))

    def first(*values):
        return next((v for v in values if v is not None), None)

    theta = first(rope.get("rope_theta"), hf.get("rope_theta"), hf.get("rotary_emb_base"), 10000.0)
    partial = first(rope.get("partial_rotary_factor"), hf.get("partial_rotary_factor"), hf.get("rotary_pct"),
                    default_partial)
    return float(theta), float(partial), rope_type


def require(hf: Dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks required key(s) {', '.join(missing)}")


def activation_from_hf(name: Any, key: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConversionError(f"config.json: {key} = {name!r} is not supported; expected one of "
                              f"{', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


class Family:
    name = ""
    architecture = ""
    model_type = ""
    prefix = ""  # HF name prefix of the base model
    ignorable: Tuple[str, ...] = ()  # non-parameter buffers some HF checkpoints carry

    # -- variants: a family whose HF layout depends on the checkpoint returns a configured copy
    def for_hf_config(self, hf: Dict[str, Any]) -> "Family":
        return self

    def for_export(self, cfg: Config, state: Dict[str, torch.Tensor]) -> "Family":
        return self

    # -- configs
    def model_keys(self, hf: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def hf_config(self, cfg: Config, vocab_size: int) -> Dict[str, Any]:
        raise NotImplementedError

    def check_exportable(self, cfg: Config) -> None:
        m = cfg.model
        refuse_unexportable_positions(cfg)
        if m.pos_emb == "rotary" and m.rotary_interleaved:
            raise ConversionError(f"{self.architecture} uses rotate-half rotary; this model has "
                                  "rotary_interleaved: true, which it cannot express")
        if m.norm == "layernorm" and not m.use_bias_in_norms:
            raise ConversionError(f"{self.architecture}'s LayerNorms have biases; this model has "
                                  "use_bias_in_norms: false")

    # -- tensor tables (ours-side names, HF names, shapes in our [out, in] orientation)
    def layer_tables(self, cfg: Config, i: int) -> Tuple[List[NormMap], List[Linear]]:
        raise NotImplementedError

    def import_qkv(self, src: TensorSource, cfg: Config, i: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def export_qkv(self, src: TensorSource, cfg: Config, i: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def globals_table(self, cfg: Config) -> Dict[str, str]:
        """ours -> HF names of embed, final norm (weight/bias), head, learned positions."""
        raise NotImplementedError

    # -- the two directions
    def to_ours(self, src: TensorSource, cfg: Config, vocab_size: int, padded_vocab: int,
                progress: bool = True) -> Dict[str, torch.Tensor]:
        m, names = cfg.model, self.globals_table(cfg)
        H = m.hidden_size
        out: Dict[str, torch.Tensor] = {}
        out["embed.weight"] = pad_rows(src.take(names["embed"], (vocab_size, H)), padded_vocab)
        if m.pos_emb == "learned":
            out["pos_embed"] = src.take(names["pos_embed"], (m.max_position_embeddings or m.seq_length, H))
        bar = Progress("importing layers", total=m.num_layers, unit="layers", enabled=progress)
        for i in range(m.num_layers):
            bar.set(i)  # layers finished
            norms, linears = self.layer_tables(cfg, i)
            for n in norms:
                get = src.peek if n.shared else src.take
                out[n.ours + ".weight"] = get(n.hf + ".weight", (n.size,))
                if n.bias:
                    out[n.ours + ".bias"] = get(n.hf + ".bias", (n.size,))
            out.update(self.import_qkv(src, cfg, i))
            for lin in linears:
                shape = (lin.inp, lin.out) if lin.conv1d else (lin.out, lin.inp)
                w = src.take(lin.hf + ".weight", shape)
                out[lin.ours + ".weight"] = w.t().contiguous() if lin.conv1d else w
                bias = src.take(lin.hf + ".bias", (lin.out,)) if lin.hf_bias else None
                if lin.our_bias:
                    out[lin.ours + ".bias"] = bias
                elif bias is not None and bias.abs().max() > 0:
                    raise ConversionError(f"tensor '{lin.hf}.bias' is non-zero but the target config "
                                          "has no bias there")
        bar.set(m.num_layers)
        bar.close()
        out["final_norm.weight"] = src.take(names["final_norm"] + ".weight", (H,))
        if m.norm == "layernorm":
            out["final_norm.bias"] = src.take(names["final_norm"] + ".bias", (H,))
        if m.no_weight_tying:
            out["lm_head.weight"] = pad_rows(src.take(names["head"], (vocab_size, H)), padded_vocab)
        else:
            src.discard(names["head"])  # a tied head may be saved as a duplicate of the embedding
        src.check_consumed()
        return out

    def to_hf(self, src: TensorSource, cfg: Config, vocab_size: int, padded_vocab: int,
              progress: bool = True) -> Dict[str, torch.Tensor]:
        self.check_exportable(cfg)
        m, names = cfg.model, self.globals_table(cfg)
        H = m.hidden_size
        out: Dict[str, torch.Tensor] = {}
        out[names["embed"]] = src.take("embed.weight", (padded_vocab, H))[:vocab_size]
        if m.pos_emb == "learned":
            out[names["pos_embed"]] = src.take("pos_embed", (m.max_position_embeddings or m.seq_length, H))
        bar = Progress("exporting layers", total=m.num_layers, unit="layers", enabled=progress)
        for i in range(m.num_layers):
            bar.set(i)  # layers finished
            norms, linears = self.layer_tables(cfg, i)
            for n in norms:
                out[n.hf + ".weight"] = src.take(n.ours + ".weight", (n.size,))
                if n.bias:
                    out[n.hf + ".bias"] = src.take(n.ours + ".bias", (n.size,))
            out.update(self.export_qkv(src, cfg, i))
            for lin in linears:
                w = src.take(lin.ours + ".weight", (lin.out, lin.inp))
                out[lin.hf + ".weight"] = w.t().contiguous() if lin.conv1d else w
                if lin.hf_bias:
                    out[lin.hf + ".bias"] = (src.take(lin.ours + ".bias", (lin.out,)) if lin.our_bias
                                             else w.new_zeros(lin.out))
        bar.set(m.num_layers)
        bar.close()
        out[names["final_norm"] + ".weight"] = src.take("final_norm.weight", (H,))
        if m.norm == "layernorm":
            out[names["final_norm"] + ".bias"] = src.take("final_norm.bias", (H,))
        if m.no_weight_tying:
            out[names["head"]] = src.take("lm_head.weight", (padded_vocab, H))[:vocab_size]
        src.check_consumed()
        return out


class NeoXFamily(Family):
    name, architecture, model_type, prefix = "neox", "GPTNeoXForCausalLM", "gpt_neox", "gpt_neox."
    ignorable = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")

    def model_keys(self, hf: Dict[str, Any]) -> Dict[str, Any]:
        require(hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        theta, partial, rope_type = rope_settings(hf, default_partial=0.25)  # HF GPTNeoXConfig default
        if rope_type != "default":
            raise ConversionError(f"config.json: rope type '{rope_type}' (rope scaling) is not supported; "
                                  "our rotary is the unscaled default")
        return dict(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            num_attention_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm="layernorm", layernorm_epsilon=float(hf.get("layer_norm_eps", 1e-5)), pos_emb="rotary",
            rotary_pct=partial, rotary_emb_base=theta, rotary_interleaved=False,
            gpt_j_residual=bool(hf.get("use_parallel_residual", True)),
            activation=activation_from_hf(hf.get("hidden_act", "gelu"), "hidden_act"),
            ffn_hidden_size=hf.get("intermediate_size") or 4 * hf["hidden_size"],
            no_weight_tying=not hf.get("tie_word_embeddings", False),
            use_bias_in_attn_linear=bool(hf.get("attention_bias", True)), use_bias_in_mlp=True)

    def check_exportable(self, cfg: Config) -> None:
        super().check_exportable(cfg)
        if cfg.model.kv_heads != cfg.model.num_attention_heads:
            raise ConversionError(f"GPTNeoXForCausalLM has no grouped-query attention; this model has "
                                  f"num_kv_heads={cfg.model.kv_heads} < num_attention_heads="
                                  f"{cfg.model.num_attention_heads}")

    def hf_config(self, cfg: Config, vocab_size: int) -> Dict[str, Any]:
        m = cfg.model
        return {
            "architectures": [self.architecture], "model_type": self.model_type, "vocab_size": vocab_size,
            "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads, "intermediate_size": ffn_size(cfg.model),
            "hidden_act": OUR_ACTIVATIONS[m.activation],
            "max_position_embeddings": m.max_position_embeddings or m.seq_length,
            "layer_norm_eps": m.layernorm_epsilon, "use_parallel_residual": m.gpt_j_residual,
            "tie_word_embeddings": not m.no_weight_tying, "attention_bias": m.use_bias_in_attn_linear,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rotary_emb_base,
                                "partial_rotary_factor": m.rotary_pct},
            # transformers v4 spellings, so older versions load the same file
            "rotary_pct": m.rotary_pct, "rotary_emb_base": m.rotary_emb_base,
            "attention_dropout": m.attention_dropout, "hidden_dropout": m.hidden_dropout,
            "initializer_range": m.init_method_std, "use_cache": True,
        }

    def globals_table(self, cfg: Config) -> Dict[str, str]:
        p = self.prefix
        return {"embed": p + "embed_in.weight", "final_norm": p + "final_layer_norm", "head": "embed_out.weight"}

    def layer_tables(self, cfg: Config, i: int) -> Tuple[List[NormMap], List[Linear]]:
        m, ours, hf = cfg.model, f"layers.{i}.", f"{self.prefix}layers.{i}."
        H, F, ab = m.hidden_size, ffn_size(cfg.model), m.use_bias_in_attn_linear
        norms = [NormMap(ours + "input_norm", hf + "input_layernorm", H, True),
                 NormMap(ours + "post_attention_norm", hf + "post_attention_layernorm", H, True)]
        linears = [Linear(ours + "attention.dense", hf + "attention.dense", H, H, ab, ab),
                   Linear(ours + "mlp.fc_in", hf + "mlp.dense_h_to_4h", F, H, m.use_bias_in_mlp, True),
                   Linear(ours + "mlp.fc_out", hf + "mlp.dense_4h_to_h", H, F, m.use_bias_in_mlp, True)]
        return norms, linears

    def import_qkv(self, src: TensorSource, cfg: Config, i: int) -> Dict[str, torch.Tensor]:
        H, hf = cfg.model.hidden_size, f"{self.prefix}layers.{i}.attention.query_key_value"
        out = {f"layers.{i}.attention.qkv.weight": src.take(hf + ".weight", (3 * H, H))}
        if cfg.model.use_bias_in_attn_linear:
            out[f"layers.{i}.attention.qkv.bias"] = src.take(hf + ".bias", (3 * H,))
        return out  # per-head [q, k, v]: already our layout (one query per KV group)

    def export_qkv(self, src: TensorSource, cfg: Config, i: int) -> Dict[str, torch.Tensor]:
        H, hf = cfg.model.hidden_size, f"{self.prefix}layers.{i}.attention.query_key_value"
        out = {hf + ".weight": src.take(f"layers.{i}.attention.qkv.weight", (3 * H, H))}
        if cfg.model.use_bias_in_attn_linear:
            out[hf + ".bias"] = src.take(f"layers.{i}.attention.qkv.bias", (3 * H,))
        return out


class LlamaFamily(Family):
    name, architecture, model_type, prefix = "llama", "LlamaForCausalLM", "llama", "model."
    ignorable = (".rotary_emb.inv_freq",)

    def model_keys(self, hf: Dict[str, Any]) -> Dict[str, Any]:
        require(hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
        H, heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, H // heads):
            raise ConversionError(f"config.json: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                                  f"= {H // heads}; our model derives head_dim from hidden_size")
        theta, _, rope_type = rope_settings(hf, default_partial=1.0)  # HF Llama rotates all of head_dim
        if rope_type != "default":
            raise ConversionError(f"config.json: rope type '{rope_type}' (rope scaling) is not supported; "
                                  "our rotary is the unscaled default")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConversionError(f"config.json: hidden_act = {act!r}; Llama import expects 'silu' (SwiGLU)")
        return dict(
            num_layers=hf["num_hidden_layers"], hidden_size=H, num_attention_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm="rmsnorm", layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), pos_emb="rotary",
            rotary_pct=1.0, rotary_emb_base=theta, rotary_interleaved=False, gpt_j_residual=False,
            activation="swiglu", ffn_hidden_size=hf["intermediate_size"],
            no_weight_tying=not hf.get("tie_word_embeddings", False),
            use_bias_in_attn_linear=bool(hf.get("attention_bias", False)),
            use_bias_in_mlp=bool(hf.get("mlp_bias", False)))

    def check_exportable(self, cfg: Config) -> None:
        super().check_exportable(cfg)
        if cfg.model.gpt_j_residual:
            raise ConversionError("LlamaForCausalLM has no parallel residual; this model has gpt_j_residual: true")
        if cfg.model.rotary_pct != 1.0:
            raise ConversionError(f"LlamaForCausalLM rotates the whole head; this model has rotary_pct "
                                  f"{cfg.model.rotary_pct}")

    def hf_config(self, cfg: Config, vocab_size: int) -> Dict[str, Any]:
        m = cfg.model
        return {
            "architectures": [self.architecture], "model_type": self.model_type, "vocab_size": vocab_size,
            "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads, "num_key_value_heads": cfg.model.kv_heads,
            "head_dim": cfg.model.head_dim, "intermediate_size": ffn_size(cfg.model), "hidden_act": "silu",
            "max_position_embeddings": m.max_position_embeddings or m.seq_length,
            "rms_norm_eps": m.norm_epsilon, "tie_word_embeddings": not m.no_weight_tying,
            "attention_bias": m.use_bias_in_attn_linear, "mlp_bias": m.use_bias_in_mlp,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rotary_emb_base},
            "rope_theta": m.rotary_emb_base,  # transformers v4 spelling
            "attention_dropout": m.attention_dropout, "initializer_range": m.init_method_std,
            "pretraining_tp": 1, "use_cache": True,
        }

    def globals_table(self, cfg: Config) -> Dict[str, str]:
        p = self.prefix
        return {"embed": p + "embed_tokens.weight", "final_norm": p + "norm", "head": "lm_head.weight"}

    def layer_tables(self, cfg: Config, i: int) -> Tuple[List[NormMap], List[Linear]]:
        m, ours, hf = cfg.model, f"layers.{i}.", f"{self.prefix}layers.{i}."
        H, F, ab, mb = m.hidden_size, ffn_size(cfg.model), m.use_bias_in_attn_linear, m.use_bias_in_mlp
        norms = [NormMap(ours + "input_norm", hf + "input_layernorm", H, False),
                 NormMap(ours + "post_attention_norm", hf + "post_attention_layernorm", H, False)]
        linears = [Linear(ours + "attention.dense", hf + "self_attn.o_proj", H, H, ab, ab),
                   Linear(ours + "mlp.fc_gate", hf + "mlp.gate_proj", F, H, mb, mb),
                   Linear(ours + "mlp.fc_in", hf + "mlp.up_proj", F, H, mb, mb),
                   Linear(ours + "mlp.fc_out", hf + "mlp.down_proj", H, F, mb, mb)]
        return norms, linears

    def _qkv_shapes(self, cfg: Config) -> Tuple[int, int, int, int]:
        d = cfg.model.head_dim
        return cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.model.kv_heads, d

    def import_qkv(self, src: TensorSource, cfg: Config, i: int) -> Dict[str, torch.Tensor]:
        H, heads, kv, d = self._qkv_shapes(cfg)
        hf = f"{self.prefix}layers.{i}.self_attn."
        rows = {"q": heads * d, "k": kv * d, "v": kv * d}
        out = {f"layers.{i}.attention.qkv.weight":
               fuse_qkv(*(src.take(f"{hf}{p}_proj.weight", (rows[p], H)) for p in "qkv"), heads, kv)}
        if cfg.model.use_bias_in_attn_linear:
            out[f"layers.{i}.attention.qkv.bias"] = fuse_qkv(
                *(src.take(f"{hf}{p}_proj.bias", (rows[p],)) for p in "qkv"), heads, kv)
        return out

    def export_qkv(self, src: TensorSource, cfg: Config, i: int) -> Dict[str, torch.Tensor]:
        H, heads, kv, d = self._qkv_shapes(cfg)
        hf, total = f"{self.prefix}layers.{i}.self_attn.", (heads + 2 * kv) * d
        out = dict(zip((f"{hf}{p}_proj.weight" for p in "qkv"),
                       split_qkv(src.take(f"layers.{i}.attention.qkv.weight", (total, H)), heads, kv)))
        if cfg.model.use_bias_in_attn_linear:
            out.update(zip((f"{hf}{p}_proj.bias" for p in "qkv"),
                           split_qkv(src.take(f"layers.{i}.attention.qkv.bias", (total,)), heads, kv)))
        return out


class GPT2Family(Family):
    name, architecture, model_type, prefix = "gpt2", "GPT2LMHeadModel", "gpt2", "transformer."
    ignorable = (".attn.bias", ".attn.masked_bias")

    def model_keys(self, hf: Dict[str, Any]) -> Dict[str, Any]:
        require(hf, "n_embd", "n_layer", "n_head", "vocab_size", "n_positions")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ConversionError("config.json: scale_attn_by_inverse_layer_idx = true is not supported")
        if hf.get("scale_attn_weights", True) is False:
            raise ConversionError("config.json: scale_attn_weights = false is not supported")
        if hf.get("add_cross_attention"):
            raise ConversionError("config.json: add_cross_attention = true is not supported")
        return dict(
            num_layers=hf["n_layer"], hidden_size=hf["n_embd"], num_attention_heads=hf["n_head"],
            max_position_embeddings=hf["n_positions"], norm="layernorm",
            layernorm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), pos_emb="learned",
            gpt_j_residual=False,
            activation=activation_from_hf(hf.get("activation_function", "gelu_new"), "activation_function"),
            ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
            no_weight_tying=not hf.get("tie_word_embeddings", True),
            use_bias_in_attn_linear=True, use_bias_in_mlp=True)

    def check_exportable(self, cfg: Config) -> None:
        super().check_exportable(cfg)
        m = cfg.model
        gqa = cfg.model.kv_heads != m.num_attention_heads
        if m.norm != "layernorm" or m.gpt_j_residual or m.activation == "swiglu" or gqa:
            raise ConversionError("GPT2LMHeadModel needs layernorm, sequential residual, a non-gated MLP "
                                  "and no grouped-query attention")

    def hf_config(self, cfg: Config, vocab_size: int) -> Dict[str, Any]:
        m = cfg.model
        return {
            "architectures": [self.architecture], "model_type": self.model_type, "vocab_size": vocab_size,
            "n_embd": m.hidden_size, "n_layer": m.num_layers, "n_head": m.num_attention_heads,
            "n_positions": m.max_position_embeddings or m.seq_length, "n_inner": ffn_size(cfg.model),
            "activation_function": OUR_ACTIVATIONS[m.activation], "layer_norm_epsilon": m.layernorm_epsilon,
            "tie_word_embeddings": not m.no_weight_tying, "scale_attn_weights": True,
            "resid_pdrop": m.hidden_dropout, "embd_pdrop": m.hidden_dropout, "attn_pdrop": m.attention_dropout,
            "initializer_range": m.init_method_std, "use_cache": True,
        }

    def globals_table(self, cfg: Config) -> Dict[str, str]:
        p = self.prefix
        return {"embed": p + "wte.weight", "pos_embed": p + "wpe.weight", "final_norm": p + "ln_f",
                "head": "lm_head.weight"}

    def layer_tables(self, cfg: Config, i: int) -> Tuple[List[NormMap], List[Linear]]:
        m, ours, hf = cfg.model, f"layers.{i}.", f"{self.prefix}h.{i}."
        H, F = m.hidden_size, ffn_size(cfg.model)
        norms = [NormMap(ours + "input_norm", hf + "ln_1", H, True),
                 NormMap(ours + "post_attention_norm", hf + "ln_2", H, True)]
        ab, mb = m.use_bias_in_attn_linear, m.use_bias_in_mlp
        linears = [Linear(ours + "attention.dense", hf + "attn.c_proj", H, H, ab, True, conv1d=True),
                   Linear(ours + "mlp.fc_in", hf + "mlp.c_fc", F, H, mb, True, conv1d=True),
                   Linear(ours + "mlp.fc_out", hf + "mlp.c_proj", H, F, mb, True, conv1d=True)]
        return norms, linears

    def import_qkv(self, src: TensorSource, cfg: Config, i: int) -> Dict[str, torch.Tensor]:
        H, heads = cfg.model.hidden_size, cfg.model.num_attention_heads
        hf = f"{self.prefix}h.{i}.attn.c_attn"
        w = src.take(hf + ".weight", (H, 3 * H)).t()  # Conv1D [in, out] -> [out = q|k|v, in]
        b = src.take(hf + ".bias", (3 * H,))
        return {f"layers.{i}.attention.qkv.weight": fuse_qkv(*w.split(H), heads, heads),
                f"layers.{i}.attention.qkv.bias": fuse_qkv(*b.split(H), heads, heads)}

    def export_qkv(self, src: TensorSource, cfg: Config, i: int) -> Dict[str, torch.Tensor]:
        H, heads = cfg.model.hidden_size, cfg.model.num_attention_heads
        hf = f"{self.prefix}h.{i}.attn.c_attn"
        w = torch.cat(split_qkv(src.take(f"layers.{i}.attention.qkv.weight", (3 * H, H)), heads, heads))
        if cfg.model.use_bias_in_attn_linear:
            b = torch.cat(split_qkv(src.take(f"layers.{i}.attention.qkv.bias", (3 * H,)), heads, heads))
        else:
            b = w.new_zeros(3 * H)
        return {hf + ".weight": w.t().contiguous(), hf + ".bias": b}


@dataclass(frozen=True)
class FalconVariant:
    """Which of Falcon's decoder layouts a checkpoint uses (config.json keys of the same names)."""

    new_decoder_architecture: bool = True
    parallel_attn: bool = True
    multi_query: bool = False
    num_ln_in_parallel_attn: int = 2  # 1: one norm shared by attention and MLP

    @property
    def norm_names(self) -> Tuple[str, str]:
        """HF names of the norms before attention and before the MLP (equal when shared)."""
        if self.new_decoder_architecture and self.num_ln_in_parallel_attn == 2:
            return "ln_attn", "ln_mlp"
        if self.parallel_attn or self.new_decoder_architecture:
            return "input_layernorm", "input_layernorm"
        return "input_layernorm", "post_attention_layernorm"


def falcon_key(hf: Dict[str, Any], *names: str, default: Any = None) -> Any:
    """A Falcon config value under its transformers name or the older RefinedWeb spelling."""
    return next((hf[n] for n in names if hf.get(n) is not None), default)


class FalconFamily(Family):
    name, architecture, model_type, prefix = "falcon", "FalconForCausalLM", "falcon", "transformer."
    ignorable = (".rotary_emb.inv_freq",)

    def __init__(self, variant: FalconVariant = FalconVariant()):
        self.variant = variant

    def for_hf_config(self, hf: Dict[str, Any]) -> "FalconFamily":
        new = bool(hf.get("new_decoder_architecture", False))
        return FalconFamily(FalconVariant(
            new_decoder_architecture=new, parallel_attn=new or bool(hf.get("parallel_attn", True)),
            multi_query=not new and bool(hf.get("multi_query", True)),
            num_ln_in_parallel_attn=int(hf.get("num_ln_in_parallel_attn") or 2) if new else 1))

    def for_export(self, cfg: Config, state: Dict[str, torch.Tensor]) -> "FalconFamily":
        """Falcon-7B's layout (old architecture, one shared norm) when the model fits it, else the
        new decoder architecture (any number of KV heads; one or two norms)."""
        m, kv = cfg.model, cfg.model.kv_heads
        old_kv = kv in (1, m.num_attention_heads)
        if not m.gpt_j_residual:
            if not old_kv:
                raise ConversionError(f"FalconForCausalLM with sequential attention + MLP needs num_kv_heads 1 or "
                                      f"{m.num_attention_heads}; this model has {kv}")
            return FalconFamily(FalconVariant(False, False, kv == 1 and m.num_attention_heads > 1, 1))
        shared = all(torch.equal(state[f"layers.{i}.input_norm.{p}"], state[f"layers.{i}.post_attention_norm.{p}"])
                     for i in range(m.num_layers) for p in ("weight", "bias"))
        if shared and old_kv:
            return FalconFamily(FalconVariant(False, True, kv == 1 and m.num_attention_heads > 1, 1))
        return FalconFamily(FalconVariant(True, True, False, 1 if shared else 2))

    def model_keys(self, hf: Dict[str, Any]) -> Dict[str, Any]:
        H = falcon_key(hf, "hidden_size", "n_embed")
        layers, heads = falcon_key(hf, "num_hidden_layers", "n_layer"), falcon_key(hf, "num_attention_heads", "n_head")
        if None in (H, layers, heads) or hf.get("vocab_size") is None:
            raise ConversionError("config.json lacks one of hidden_size, num_hidden_layers, num_attention_heads, "
                                  "vocab_size")
        if hf.get("alibi"):
            raise ConversionError("config.json: alibi = true (Falcon-RW's ALiBi positions) is not supported; "
                                  "only rotary Falcon models convert")
        theta, partial, rope_type = rope_settings(hf, default_partial=1.0)
        if rope_type != "default" or partial != 1.0:
            raise ConversionError(f"config.json: rope type '{rope_type}' with partial factor {partial} is not "
                                  "supported; Falcon import expects the default rotary over the whole head")
        v, bias = self.for_hf_config(hf).variant, bool(hf.get("bias", False))
        kv = (falcon_key(hf, "num_kv_heads", "n_head_kv", default=heads) if v.new_decoder_architecture
              else 1 if v.multi_query else heads)
        return dict(
            num_layers=layers, hidden_size=H, num_attention_heads=heads, num_kv_heads=kv,
            max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="layernorm",
            layernorm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), pos_emb="rotary", rotary_pct=1.0,
            rotary_emb_base=theta, rotary_interleaved=False, gpt_j_residual=v.parallel_attn,
            activation=activation_from_hf(hf.get("activation", "gelu"), "activation"),
            intermediate_size=hf.get("ffn_hidden_size") or 4 * H,
            no_weight_tying=not hf.get("tie_word_embeddings", True),
            use_bias_in_attn_linear=bias, use_bias_in_mlp=bias)

    def check_exportable(self, cfg: Config) -> None:
        super().check_exportable(cfg)
        m = cfg.model
        if m.pos_emb != "rotary" or m.rotary_pct != 1.0 or m.norm != "layernorm" or m.activation == "swiglu":
            raise ConversionError("FalconForCausalLM needs rotary over the whole head (rotary_pct 1.0), layernorm "
                                  "and a non-gated MLP")

    def hf_config(self, cfg: Config, vocab_size: int) -> Dict[str, Any]:
        m, v = cfg.model, self.variant
        config = {
            "architectures": [self.architecture], "model_type": self.model_type, "vocab_size": vocab_size,
            "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_kv_heads": m.kv_heads if v.new_decoder_architecture else m.num_attention_heads,
            "new_decoder_architecture": v.new_decoder_architecture, "parallel_attn": v.parallel_attn,
            "multi_query": v.multi_query, "alibi": False,
            "bias": m.use_bias_in_attn_linear or m.use_bias_in_mlp, "ffn_hidden_size": ffn_size(cfg.model),
            "activation": OUR_ACTIVATIONS[m.activation], "layer_norm_epsilon": m.layernorm_epsilon,
            "max_position_embeddings": m.max_position_embeddings or m.seq_length,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rotary_emb_base},
            "rope_theta": m.rotary_emb_base,  # transformers v4 spelling
            "tie_word_embeddings": not m.no_weight_tying, "hidden_dropout": m.hidden_dropout,
            "attention_dropout": m.attention_dropout, "initializer_range": m.init_method_std, "use_cache": True,
        }
        if v.new_decoder_architecture:
            config["num_ln_in_parallel_attn"] = v.num_ln_in_parallel_attn
        return config

    def globals_table(self, cfg: Config) -> Dict[str, str]:
        p = self.prefix
        return {"embed": p + "word_embeddings.weight", "final_norm": p + "ln_f", "head": "lm_head.weight"}

    def layer_tables(self, cfg: Config, i: int) -> Tuple[List[NormMap], List[Linear]]:
        m, ours, hf = cfg.model, f"layers.{i}.", f"{self.prefix}h.{i}."
        H, F = m.hidden_size, ffn_size(cfg.model)
        bias, ab, mb = m.use_bias_in_attn_linear or m.use_bias_in_mlp, m.use_bias_in_attn_linear, m.use_bias_in_mlp
        before_attention, before_mlp = self.variant.norm_names
        norms = [NormMap(ours + "input_norm", hf + before_attention, H, True, shared=before_attention == before_mlp),
                 NormMap(ours + "post_attention_norm", hf + before_mlp, H, True)]
        linears = [Linear(ours + "attention.dense", hf + "self_attention.dense", H, H, ab, bias),
                   Linear(ours + "mlp.fc_in", hf + "mlp.dense_h_to_4h", F, H, mb, bias),
                   Linear(ours + "mlp.fc_out", hf + "mlp.dense_4h_to_h", H, F, mb, bias)]
        return norms, linears

    def _qkv(self, cfg: Config, i: int) -> Tuple[str, int]:
        m = cfg.model
        rows = (m.num_attention_heads + 2 * m.kv_heads) * m.head_dim
        return f"{self.prefix}h.{i}.self_attention.query_key_value", rows

    def import_qkv(self, src: TensorSource, cfg: Config, i: int) -> Dict[str, torch.Tensor]:
        hf, rows = self._qkv(cfg, i)
        out = {f"layers.{i}.attention.qkv.weight": src.take(hf + ".weight", (rows, cfg.model.hidden_size))}
        if cfg.model.use_bias_in_attn_linear:
            out[f"layers.{i}.attention.qkv.bias"] = src.take(hf + ".bias", (rows,))
        return out  # all three Falcon layouts are ours already

    def export_qkv(self, src: TensorSource, cfg: Config, i: int) -> Dict[str, torch.Tensor]:
        hf, rows = self._qkv(cfg, i)
        m = cfg.model
        out = {hf + ".weight": src.take(f"layers.{i}.attention.qkv.weight", (rows, m.hidden_size))}
        if m.use_bias_in_attn_linear:
            out[hf + ".bias"] = src.take(f"layers.{i}.attention.qkv.bias", (rows,))
        elif m.use_bias_in_mlp:  # Falcon has one bias switch for every linear
            out[hf + ".bias"] = out[hf + ".weight"].new_zeros(rows)
        return out


FAMILIES: Dict[str, Family] = {f.model_type: f for f in (NeoXFamily(), LlamaFamily(), GPT2Family(), FalconFamily())}
ARCHITECTURES = {f.architecture: f for f in FAMILIES.values()}


def family_from_hf_config(hf: Dict[str, Any]) -> Family:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch].for_hf_config(hf)
    model_type = hf.get("model_type")
    if model_type in FAMILIES and not archs:
        return FAMILIES[model_type].for_hf_config(hf)
    found = ", ".join(archs) if archs else f"model_type {model_type!r}"
    raise ConversionError(f"config.json: unsupported architecture {found}; supported: {SUPPORTED}")


def refuse_unexportable_positions(cfg: Config) -> None:
    """ALiBi and BiPE have no counterpart in the exported transformers classes."""
    m = cfg.model
    if m.bipe or m.pos_emb == "alibi":
        what = "BiPE (bipe: true)" if m.bipe else "ALiBi (pos_emb: alibi)"
        raise ConversionError(f"{what} models cannot be exported to transformers yet: the exported classes "
                              "have no such position encoding")


def family_for_model(cfg: Config, architecture: Optional[str] = None) -> Family:
    """Which HF class expresses our model: ``architecture`` (an HF class or model_type) when given,
    else decided by positions, norm, MLP kind and grouped-query attention."""
    m = cfg.model
    refuse_unexportable_positions(cfg)
    if architecture:
        family = ARCHITECTURES.get(architecture) or FAMILIES.get(architecture)
        if family is None:
            raise ConversionError(f"unknown architecture {architecture!r}; choose one of {SUPPORTED}")
        return family
    if m.pos_emb == "rotary" and m.norm == "layernorm" and m.activation in OUR_ACTIVATIONS \
            and m.kv_heads != m.num_attention_heads:
        return FAMILIES["falcon"]  # GPT-NeoX has no grouped-query attention; Falcon does
    if m.pos_emb == "learned":
        return FAMILIES["gpt2"]
    if m.pos_emb == "rotary" and m.norm == "rmsnorm" and m.activation == "swiglu":
        return FAMILIES["llama"]
    if m.pos_emb == "rotary" and m.norm == "layernorm" and m.activation in OUR_ACTIVATIONS:
        return FAMILIES["gpt_neox"]
    raise ConversionError(f"no HF architecture matches pos_emb={m.pos_emb}, norm={m.norm}, activation="
                          f"{m.activation}; exportable: rotary+layernorm+gelu/relu (GPT-NeoX), "
                          "rotary+rmsnorm+swiglu (Llama), learned+layernorm (GPT-2), rotary+layernorm+GQA (Falcon)")


def strip_gpt2_prefix(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Original OpenAI GPT-2 checkpoints name tensors without the 'transformer.' prefix."""
    if "wte.weight" in tensors and "transformer.wte.weight" not in tensors:
        return {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in tensors.items()}
    return tensors
