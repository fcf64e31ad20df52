"""FP8 weights (dgemma/fp8.py): compressed-tensors FP8 checkpoints written by the compressed-tensors library load and
compute what a dequantised copy of the same weights computes; `quantization="fp8"` quantises a float checkpoint as
it loads; both engine modes run FP8 experts without host syncs; bad FP8 checkpoints fail with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dgemma import LLM, SamplingParams, batch_invariant, checkpoint, fp8
from dgemma.config import ModelConfig
from dgemma.kv_cache import DecodeSegment, EncodeSegment, KVCache
from dgemma.llm import default_model_path
from dgemma.model import DiffusionGemma

from helpers import tiny_text_config

ct = pytest.importorskip("compressed_tensors")  # the `test` extra installs it
from compressed_tensors.compressors import FloatQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from compressed_tensors.utils import match_name  # noqa: E402

IGNORE = ["re:.*\\.router\\..*", "re:.*self_conditioning.*", "lm_head"]
MODES = {"exact": True, "fast": False}


def tiny_model(seed: int) -> DiffusionGemma:
    text = tiny_text_config(hidden_size=64, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 8, "text_config": text})
    model = DiffusionGemma(cfg)
    model.init_weights(std=0.15, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def decoder_logits(model: DiffusionGemma, seed: int = 7, mode: str = "exact") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v, c = model.text.vocab_size, model.config.canvas_length
    prompt, canvas = torch.randint(0, v, (2, 12), generator=g), torch.randint(0, v, (2, c), generator=g)
    sc_logits = torch.randn(2, c, v, generator=g) * 3
    if mode == "fast":  # as the engine does: fused q/k/v and gate/up (with fused FP8 scales)
        model.fuse_projections()
    with batch_invariant.mode(MODES[mode]):
        kv = KVCache(model.text, num_slots=2, capacity=12 + c, dtype=model.dtype)
        seg = EncodeSegment(kv, prompt, slots=[0, 1])
        model([seg])
        seg.finish()
        (hidden,) = model([DecodeSegment(kv, canvas, slots=[0, 1], sc_embeds=model.soft_embed(sc_logits))])
        return model.logits(hidden)


# MARK: checkpoints written with the compressed-tensors library


def ct_quantize(w: torch.Tensor, scheme: QuantizationScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale) as the compressed-tensors library computes and compresses them."""
    per_tensor = scheme.weights.strategy == "tensor"
    lo = w.amin() if per_tensor else w.amin(dim=-1, keepdim=True)
    hi = w.amax() if per_tensor else w.amax(dim=-1, keepdim=True)
    scale, _ = calculate_qparams(lo, hi, scheme.weights)
    out = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
    return out["weight"], out["weight_scale"]


def ct_dequantize(q: torch.Tensor, scale: torch.Tensor, scheme: QuantizationScheme) -> torch.Tensor:
    return FloatQuantizationCompressor.decompress({"weight": q, "weight_scale": scale}, scheme)["weight"]


def write_ct_checkpoint(model: DiffusionGemma, path: Path, strategy: str = "channel",
                        ignore=IGNORE) -> dict[str, torch.Tensor]:
    """Save `model` as a compressed-tensors FP8-dynamic checkpoint (experts as per-expert Linear weights, the layout
    llm-compressor writes), every quantised tensor made by the library. Returns the dequantised weights by dgemma
    parameter name (the reference)."""
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    scheme.weights.strategy = strategy
    checkpoint.save(model, path)
    tensors, reference = {}, {}
    for name, t in model.state_dict().items():
        if "inv_freq" in name:
            continue
        cname = checkpoint.to_checkpoint_name(name)
        module, _, leaf = cname.rpartition(".")
        if leaf in ("gate_up_proj", "down_proj") and not any(match_name(module, i) for i in ignore):
            m = model.text.moe_intermediate_size
            deq = torch.empty_like(t)
            for e in range(t.shape[0]):
                parts = {"gate_proj": t[e, :m], "up_proj": t[e, m:]} if leaf == "gate_up_proj" else {"down_proj": t[e]}
                rows = 0
                for proj, w in parts.items():
                    q, s = ct_quantize(w.contiguous(), scheme)
                    tensors[f"{module}.{e}.{proj}.weight"], tensors[f"{module}.{e}.{proj}.weight_scale"] = q, s
                    deq[e, rows:rows + w.shape[0]] = ct_dequantize(q, s, scheme)
                    rows += w.shape[0]
            reference[name] = deq
        elif leaf == "weight" and t.ndim == 2 and "embed_tokens" not in cname and \
                not any(match_name(module, i) for i in ignore):
            q, s = ct_quantize(t, scheme)
            tensors[cname], tensors[cname + "_scale"] = q, s
            reference[name] = ct_dequantize(q, s, scheme)
        else:
            tensors[cname] = t.contiguous()
    (path / "model.safetensors").unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore), format="float-quantized",
                            quantization_status="compressed")
    config["quantization_config"] = qc.model_dump(mode="json")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return reference


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_checkpoint_matches_its_dequantised_weights(tmp_path, strategy):
    """A checkpoint made with the compressed-tensors library loads with its weights in FP8 (the ignored modules in
    fp32), and its logits equal those of the float model holding the library's dequantisation of the same weights,
    in both engine modes, over three models."""
    for seed in range(3):
        model = tiny_model(seed)
        reference = write_ct_checkpoint(model, tmp_path / f"ct{seed}", strategy)
        ck = checkpoint.load(tmp_path / f"ct{seed}")
        layer = ck.model.layers[0]
        assert layer.self_attn.q_proj.weight.dtype == layer.experts.gate_up_proj.dtype == fp8.FP8
        assert layer.router.proj.weight.dtype == ck.model.self_conditioning.gate_proj.weight.dtype == torch.float32
        assert layer.experts.down_proj_scale.shape == (4, 64, 1)
        ck.model.fuse_projections()
        assert layer.self_attn.fused.dtype == fp8.FP8 and layer.self_attn.fused_scale.shape == (64 + 32 + 32, 1)
        assert layer.self_attn.k_proj.weight_scale.data_ptr() == layer.self_attn.fused_scale[64:].data_ptr()
        with torch.no_grad():
            for name, w in reference.items():
                model.get_parameter(name).copy_(w)
        for mode in MODES:
            want = decoder_logits(model, mode=mode)
            got = decoder_logits(ck.model, mode=mode)
            assert rel_err(got, want) <= 1e-3, (seed, mode)
        # and the weights really are quantised: the float original is measurably elsewhere
        assert rel_err(decoder_logits(tiny_model(seed)), want) > 1e-3


def test_dgemma_quantization_config_is_valid_compressed_tensors():
    """The quantization_config dgemma writes parses in compressed-tensors as the FP8-dynamic scheme."""
    qc = QuantizationConfig.model_validate(fp8.Fp8Scheme().to_config())
    group = qc.config_groups["group_0"]
    preset = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    assert group.weights == preset.weights and group.input_activations == preset.input_activations
    assert qc.format == "float-quantized" and fp8.Fp8Scheme.from_config({"quantization_config": qc.model_dump(
        mode="json")}) == fp8.Fp8Scheme()


# MARK: quantisation on load


def test_quantize_on_load_equals_quantizing_each_tensor(tmp_path):
    """quantization="fp8" gives each quantised weight the per-row fp8 and scale of fp8.quantize applied to the float
    tensor, keeps the ignored modules and the rest in the checkpoint dtype, and its logits sit near the float ones."""
    model = tiny_model(0)
    checkpoint.save(model, tmp_path / "f")
    ck = checkpoint.load(tmp_path / "f", quantization="fp8")
    q_proj = ck.model.layers[1].self_attn.q_proj
    q, s = fp8.quantize(model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(q_proj.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(q_proj.weight_scale, s)
    q, s = fp8.quantize(model.layers[0].experts.down_proj)
    experts = ck.model.layers[0].experts
    assert torch.equal(experts.down_proj.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(experts.down_proj_scale, s)
    assert ck.model.layers[0].router.proj.weight.dtype == torch.float32
    assert ck.config.raw["quantization_config"]["format"] == "float-quantized"
    in_memory = fp8.quantize_model(tiny_model(0))  # the same, for a model built in memory
    for (name, a), b in zip(in_memory.state_dict().items(), ck.model.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    assert in_memory.config.raw["quantization_config"] == ck.config.raw["quantization_config"]
    # A random model with weights of std 0.15 is harsh on 8-bit weights (the trained default model: below 5%).
    errs = [rel_err(decoder_logits(ck.model, seed), decoder_logits(model, seed)) for seed in range(3)]
    assert all(1e-3 < e < 0.25 for e in errs), errs


def test_fp8_model_saves_as_compressed_tensors_and_reloads_identically(tmp_path):
    """Saving an FP8 model writes the compressed-tensors layout (per-expert FP8 Linear weights with weight_scale,
    the quantization_config), which the library decompresses to dgemma's dequantised weights and which dgemma
    reloads bit for bit, with identical logits."""
    from safetensors.torch import load_file

    checkpoint.save(tiny_model(3), tmp_path / "f")
    q = checkpoint.load(tmp_path / "f", dtype="bfloat16", quantization="fp8")
    checkpoint.save(q.model, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    piece = "model.decoder.layers.1.experts.2.up_proj."
    assert tensors[piece + "weight"].dtype == fp8.FP8 and tensors[piece + "weight_scale"].shape == (32, 1)
    assert not any(n.endswith(("experts.gate_up_proj", "_proj_scale")) for n in tensors)
    assert tensors["model.decoder.layers.0.router.proj.weight"].dtype == torch.bfloat16
    scheme = QuantizationConfig.model_validate(
        json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]).config_groups["group_0"]
    experts = q.model.layers[1].experts
    want = fp8.dequantize(experts.gate_up_proj[2, 32:], experts.gate_up_proj_scale[2, 32:], torch.float32)
    assert torch.equal(ct_dequantize(tensors[piece + "weight"], tensors[piece + "weight_scale"], scheme), want)
    again = checkpoint.load(tmp_path / "q")
    for (name, a), b in zip(q.model.state_dict().items(), again.model.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    assert torch.equal(decoder_logits(again.model), decoder_logits(q.model))
    checkpoint.save(q.model, tmp_path / "shards", max_shard_bytes=20_000)  # expert pieces spread over many shards
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 5
    assert torch.equal(decoder_logits(checkpoint.load(tmp_path / "shards").model), decoder_logits(q.model))


def test_transformers_loads_the_fp8_export_to_the_same_logits(tmp_path, monkeypatch):
    """The round trip: a transformers model, quantised by dgemma as it loads and saved (the compressed-tensors FP8
    checkpoint `dgemma export --quantization fp8` writes), loads back in transformers 5.23 with compressed-tensors
    (decompressed on load: `CompressedTensorsConfig(dequantize=True)`, and the per-expert FP8 Linear weights merged
    into its 3-D experts by a registered conversion mapping, docs/fp8.md). Every weight is dgemma's dequantised
    weight bit for bit, and the decoder logits equal dgemma's FP8 model's (exact mode) to 1e-5, over two models."""
    from helpers import make_hf_model
    from transformers import CompressedTensorsConfig, DiffusionGemmaForBlockDiffusion, DynamicCache
    from transformers import conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    for seed in range(2):  # saved before the mapping is registered (save_pretrained would split the experts too)
        make_hf_model(canvas_length=8, seed=seed).save_pretrained(tmp_path / f"hf{seed}")
    conversion_mapping.get_checkpoint_conversion_mapping("diffusion_gemma")  # builds the registry
    monkeypatch.setitem(conversion_mapping._checkpoint_conversion_mapping_cache, "diffusion_gemma", [
        WeightConverter(source_patterns=["experts.*.gate_proj.weight", "experts.*.up_proj.weight"],
                        target_patterns="experts.gate_up_proj",
                        operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
        WeightConverter(source_patterns="experts.*.down_proj.weight", target_patterns="experts.down_proj",
                        operations=[MergeModulelist(dim=0)])])
    for seed in range(2):
        q = checkpoint.load(tmp_path / f"hf{seed}", quantization="fp8")
        checkpoint.save(q.model, tmp_path / f"fp8_{seed}", q.generation)
        back, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
            tmp_path / f"fp8_{seed}", quantization_config=CompressedTensorsConfig(dequantize=True),
            output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        hf = back.state_dict()
        for name, t in q.model.state_dict().items():
            if "inv_freq" in name or name.endswith(fp8.SCALE_SUFFIX):
                continue
            mod, _, attr = name.rpartition(".")
            scale = getattr(q.model.get_submodule(mod), attr + fp8.SCALE_SUFFIX, None)
            want = t if scale is None else fp8.dequantize(t, scale, torch.float32)
            assert torch.equal(hf[checkpoint.to_checkpoint_name(name)], want), name
        g = torch.Generator().manual_seed(seed)
        prompt, canvas = torch.randint(0, 96, (1, 11), generator=g), torch.randint(0, 96, (1, 8), generator=g)
        with torch.no_grad():
            cache = DynamicCache(config=back.config.text_config)
            back.model.encoder(input_ids=prompt, past_key_values=cache, use_cache=True)
            ref = back(decoder_input_ids=canvas, past_key_values=cache).logits
            with batch_invariant.mode(True):
                kv = KVCache(q.model.text, num_slots=1, capacity=11 + 8)
                seg = EncodeSegment(kv, prompt, slots=[0])
                q.model([seg])
                seg.finish()
                (hidden,) = q.model([DecodeSegment(kv, canvas, slots=[0])])
                got = q.model.logits(hidden)
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5, seed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_file_reads_in_slabs_what_the_file_holds(tmp_path, dtype):
    """WeightFile reads a tensor a few rows per read: converted to another dtype it equals the tensor's `.to`, and
    quantised it equals fp8.quantize of the tensor, for 0-D, 1-D, 2-D and 3-D tensors; kept in its dtype on the CPU
    it is the memory-mapped tensor; a truncated file is an error, not garbage."""
    from dgemma.weight_file import WeightFile

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 24, generator=g).to(dtype), "b": torch.randn(3, 10, 16, generator=g).to(dtype),
               "c": torch.randn(5, generator=g).to(dtype), "d": torch.tensor(2.5, dtype=dtype)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with WeightFile(tmp_path / "t.safetensors", slab_bytes=7 * 24 * 2) as f:
        for name, t in tensors.items():
            assert torch.equal(f.read(name), t) and f.read(name).dtype == dtype
            for to in (torch.float32, torch.bfloat16, torch.float16):
                got = f.read(name, "cpu", to)
                assert got.dtype == to and got.shape == t.shape and torch.equal(got, t.to(to)), (name, to)
            if t.ndim >= 2:
                q, s = f.read_quantized(name)
                want_q, want_s = fp8.quantize(t)
                assert q.shape == t.shape and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
                assert torch.equal(s, want_s)
    with WeightFile(tmp_path / "t.safetensors") as f:  # the file shrinks under an open reader
        with open(tmp_path / "t.safetensors", "r+b") as fh:
            fh.truncate(f.entries["b"].start + 8)
        with pytest.raises(ValueError, match="truncated"):
            f.read("b", "cpu", torch.float64)


def test_quantize_is_within_fp8_rounding():
    """Per-row scales map each row's largest magnitude to 448 exactly, and every element comes back within half an
    fp8 step (relative 2^-4 of its magnitude, or the subnormal step), over several seeds and magnitudes."""
    for seed in range(4):
        w = torch.randn(32, 48, generator=torch.Generator().manual_seed(seed)) * 10.0 ** (seed - 2)
        w[3] = 0
        w0 = w.clone()
        q, s = fp8.quantize(w)
        q5, s5 = fp8.quantize(w, chunk_elements=5 * 48)  # five rows at a time: the same numbers
        assert torch.equal(w, w0) and torch.equal(q5.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s5, s)
        assert q.dtype == fp8.FP8 and s.shape == (32, 1) and s[3].item() == 1.0
        assert torch.equal(q.float().abs().amax(-1)[torch.arange(32) != 3], torch.full((31,), 448.0))
        back = fp8.dequantize(q, s, torch.float32)
        assert ((back - w).abs() <= torch.maximum(w.abs() * 2 ** -4, s * 2 ** -10)).all()


def test_default_model_in_fp8_generates_text_and_holds_about_half_the_bytes():
    """The embedded model under quantization fp8: text comes out in both modes; its parameters hold 0.59x the bytes
    of the bf16 model (the embedding, router and self-conditioning stay bf16; the quantised weights alone are half
    plus their scales); its decoder logits stay within 5% (relative L2) of the bf16 model's."""
    bf16 = LLM(dtype="bfloat16")
    q = LLM(dtype="bfloat16", quantization="fp8")
    ratio = fp8.parameter_bytes(q.model) / fp8.parameter_bytes(bf16.model)
    assert 0.5 < ratio < 0.6, ratio
    errs = [rel_err(decoder_logits(q.model, seed), decoder_logits(bf16.model, seed)) for seed in range(3)]
    assert max(errs) < 0.05, errs
    for bi in (True, False):
        llm = LLM(dtype="bfloat16", quantization="fp8", batch_invariant=bi)
        out = llm.generate(["ROMEO:"], SamplingParams(max_new_tokens=32, seed=0))[0]
        assert len(out.token_ids) == 32 and out.text.strip()


# MARK: the FP8 GEMM (torch._scaled_mm, which this CPU build also runs)


def test_scaled_linear_is_the_product_of_per_token_fp8_activations_and_fp8_weights():
    """fp8.scaled_linear (the CUDA dense path) computes, to bf16 output rounding, dequant(quantised x) @
    dequant(w)^T, with x quantised per token (each row's largest magnitude at 448), over several seeds and shapes;
    its distance from the unquantised-activation product is the activation quantisation's (about 2%)."""
    for seed, (m, k, n) in enumerate([(5, 96, 64), (1, 64, 128), (33, 128, 32), (0, 32, 16)]):
        g = torch.Generator().manual_seed(seed)
        q, s = fp8.quantize(torch.randn(n, k, generator=g))
        x = (torch.randn(m, k, generator=g) * 3).bfloat16()
        got = fp8.scaled_linear(x, q, s)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        if m == 0:
            continue
        xq, xs = fp8.quantize(x)
        assert torch.equal(xq.float().abs().amax(-1), torch.full((m,), 448.0))
        want = torch.nn.functional.linear(fp8.dequantize(xq, xs, torch.float32), fp8.dequantize(q, s, torch.float32))
        assert rel_err(got, want) <= 4e-3, seed
        exact = torch.nn.functional.linear(x.float(), fp8.dequantize(q, s, torch.float32))
        assert 1e-3 < rel_err(got, exact) < 0.05


def reference_scaled_grouped_mm(a, b, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None,
                                use_fast_accum=False):
    """torch._scaled_grouped_mm (2-D a, 3-D b, row-wise scales) as dequantised fp32 products, group by group, with
    the layout checks of its CUDA kernel; stands in for the kernel, which this CPU build lacks."""
    assert a.dtype == b.dtype == fp8.FP8 and out_dtype == torch.bfloat16 and offs.dtype == torch.int32
    assert bias is None and scale_result is None
    assert a.stride(-1) == 1 and b.stride(-2) == 1, "a row-major, b column-major"
    assert scale_a.shape == (a.shape[0],) and scale_b.shape == (b.shape[0], b.shape[2])
    assert scale_a.dtype == scale_b.dtype == torch.float32 and a.shape[1] % 16 == 0 and b.shape[2] % 16 == 0
    out, start = torch.zeros(a.shape[0], b.shape[2], dtype=out_dtype), 0
    for g, end in enumerate(offs.tolist()):
        deq_a = a[start:end].float() * scale_a[start:end, None]
        out[start:end] = (deq_a @ (b[g].float() * scale_b[g][None, :])).to(out_dtype)
        start = end
    return out


def test_scaled_grouped_mm_is_the_product_of_per_token_fp8_activations_and_each_experts_fp8_weights(monkeypatch):
    """fp8.scaled_grouped_mm (the CUDA experts' path, run through a dequantised stand-in of the kernel) computes, per
    row, dequant(x quantised per token) @ dequant(w[its group])^T, groups given by their ends (empty groups too),
    over several seeds and shapes; the activation quantisation moves it 0.1-5% from the unquantised product."""
    monkeypatch.setattr(torch, "_scaled_grouped_mm", reference_scaled_grouped_mm, raising=False)
    for seed, (g_, n, k, ends) in enumerate([(4, 32, 64, [5, 5, 17, 24]), (3, 48, 16, [0, 1, 9]),
                                             (1, 16, 32, [7]), (5, 64, 32, [2, 4, 4, 30, 31])]):
        gen = torch.Generator().manual_seed(seed)
        w, ws = fp8.quantize(torch.randn(g_, n, k, generator=gen) * 0.1)
        x = (torch.randn(ends[-1], k, generator=gen) * 3).bfloat16()
        x[0] = 0  # an all-zero token
        offs = torch.tensor(ends, dtype=torch.int32)
        got = fp8.scaled_grouped_mm(x, w, ws, offs)
        assert got.dtype == torch.bfloat16 and got.shape == (ends[-1], n)
        group = torch.searchsorted(offs, torch.arange(ends[-1], dtype=torch.int32), right=True)
        xq, xs = fp8.quantize(x)
        deq_w = fp8.dequantize(w, ws, torch.float32)[group]  # [S, N, K]: each row's expert
        want = torch.einsum("sk,snk->sn", fp8.dequantize(xq, xs, torch.float32), deq_w)
        assert rel_err(got, want) <= 4e-3, seed
        assert not got[0].any()
        exact = torch.einsum("sk,snk->sn", x.float(), deq_w)
        assert 1e-3 < rel_err(got, exact) < 0.05, seed


def test_scaled_grouped_mm_runs_only_where_torch_has_the_kernel():
    """The guard: sm90 and sm100 only (torch's kernel set: not sm89, not sm120), bf16, both dims multiples of 16,
    and never on the CPU."""
    ok = fp8.grouped_supported
    assert ok((9, 0), torch.bfloat16, (8, 64, 32), (8, 32, 48)) and ok((10, 0), torch.bfloat16, (8, 64, 32))
    assert not ok((8, 9), torch.bfloat16, (8, 64, 32)) and not ok((12, 0), torch.bfloat16, (8, 64, 32))
    assert not ok((9, 0), torch.float16, (8, 64, 32)) and not ok((9, 0), torch.bfloat16, (8, 64, 32), (8, 24, 64))
    assert not fp8.scaled_grouped_mm_ok(torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(2, 32, 64))


def test_model_on_the_fp8_gemm_path_generates_near_the_dequantised_path(monkeypatch):
    """With the FP8 GEMMs allowed off CUDA, the default model's fast mode runs every dense FP8 layer through
    torch._scaled_mm and the experts through torch._scaled_grouped_mm (here a dequantised stand-in of the CUDA
    kernel): it still writes text, its logits stay within 5% of the dequantised path's, and exact mode never takes
    them (batch invariance needs the tiled matmul)."""
    q = LLM(dtype="bfloat16", quantization="fp8", batch_invariant=False)
    base = [decoder_logits(q.model, seed, "fast") for seed in range(3)]
    calls, grouped = [], []
    real = fp8.scaled_linear
    monkeypatch.setattr(fp8, "scaled_mm_ok", lambda x, w: x.dtype == torch.bfloat16)
    monkeypatch.setattr(fp8, "scaled_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(fp8, "scaled_grouped_mm_ok", lambda x, *w: x.dtype == torch.bfloat16)
    monkeypatch.setattr(torch, "_scaled_grouped_mm",
                        lambda *a, **k: grouped.append(1) or reference_scaled_grouped_mm(*a, **k), raising=False)
    decoder_logits(q.model, 0, "exact")
    assert not calls and not grouped
    errs = [rel_err(decoder_logits(q.model, seed, "fast"), b) for seed, b in enumerate(base)]
    # 3 seeds x 2 forwards (prompt, canvas) x 2 GEMMs per layer
    assert calls and len(grouped) == 3 * 2 * 2 * q.model.text.num_hidden_layers and max(errs) < 0.05, errs
    out = q.generate(["ROMEO:"], SamplingParams(max_new_tokens=32, seed=0))[0]
    assert len(out.token_ids) == 32 and out.text.strip()


# MARK: the fast step


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_fp8_experts_grouped_path_has_no_sync_or_expert_loop_and_agrees_with_exact(tmp_path):
    """Fast mode runs FP8 experts as two grouped GEMMs over dequantised stacks (no bincount, no host read-back, the
    same op count whatever the number of experts), and agrees with the exact per-expert path."""
    model = tiny_model(1)
    checkpoint.save(model, tmp_path / "f")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 64, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(24)])
    weights = torch.rand(24, 2, generator=g)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        experts = checkpoint.load(tmp_path / "f", dtype=dtype, quantization="fp8").model.layers[0].experts
        outs = {}
        for mode, on in MODES.items():
            with torch.no_grad(), batch_invariant.mode(on), _OpCounter() as counter:
                outs[mode] = experts(x.to(dtype), weights, idx)
            if mode == "fast":
                assert sum(op in ("_grouped_mm", "grouped_mm") for op in counter.ops) == 2, counter.ops
                assert "bincount" not in counter.ops and "_local_scalar_dense" not in counter.ops
                assert "mm" not in counter.ops
        assert outs["fast"].dtype == dtype and rel_err(outs["fast"], outs["exact"]) <= tol


def test_fp8_model_compiles_fullgraph(tmp_path):
    """The FP8 layers trace with torch.compile(fullgraph=True) (aot_eager, as the fast step's test) to the eager
    result."""
    model = tiny_model(2)
    checkpoint.save(model, tmp_path / "f")
    q = checkpoint.load(tmp_path / "f", quantization="fp8").model
    layer = q.layers[0]
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))

    def ffn(x):
        weights, idx = layer.router(x)
        return layer.mlp(x) + layer.experts(x, weights, idx) + layer.self_attn.o_proj(x)

    with torch.no_grad():
        eager = ffn(x)
        torch._dynamo.reset()
        compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")(x)
        assert rel_err(compiled, eager) <= 1e-6
        w = layer.mlp.down_proj  # and the FP8 GEMM path (torch._scaled_mm, here on the CPU)
        xb = torch.randn(16, w.weight.shape[1], generator=torch.Generator().manual_seed(1)).bfloat16()
        torch._dynamo.reset()
        compiled = torch.compile(fp8.scaled_linear, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(xb, w.weight, w.weight_scale), fp8.scaled_linear(xb, w.weight, w.weight_scale))


def test_fp8_experts_on_the_scaled_grouped_gemm_trace_fullgraph(tmp_path, monkeypatch):
    """The FP8 experts on the CUDA path trace with torch.compile(fullgraph=True) through AOT autograd (as aot_eager,
    so no host sync and no loop over experts): two aten._scaled_grouped_mm calls and no other GEMM, their layouts
    accepted by the op's own checks (its meta kernel, run on fake tensors while tracing; a contiguous [G, K, N] stack
    is refused there); the graph, run with a dequantised stand-in of the kernel, gives the eager result, within 5%
    of the exact path, over three draws."""
    from torch._dynamo.backends.common import aot_autograd

    model = tiny_model(2)
    checkpoint.save(model, tmp_path / "f")
    experts = checkpoint.load(tmp_path / "f", dtype="bfloat16", quantization="fp8").model.layers[0].experts
    monkeypatch.setattr(fp8, "scaled_grouped_mm_ok", lambda x, *w: x.dtype == torch.bfloat16)
    graphs = []

    def substitute(gm, example_inputs):  # the traced aten graph, its kernel calls pointed at the stand-in
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten._scaled_grouped_mm.default:
                node.target = reference_scaled_grouped_mm
        gm.recompile()
        return gm

    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(24, 64, generator=g).bfloat16()
        idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(24)])
        weights = torch.rand(24, 2, generator=g)
        with torch.no_grad(), batch_invariant.mode(False):
            torch._dynamo.reset()
            compiled = torch.compile(experts, fullgraph=True, backend=aot_autograd(fw_compiler=substitute))(
                x, weights, idx)
            with monkeypatch.context() as m:
                m.setattr(torch, "_scaled_grouped_mm", reference_scaled_grouped_mm)
                eager = experts(x, weights, idx)
        with torch.no_grad(), batch_invariant.mode(True):
            exact = experts(x, weights, idx)
        assert torch.equal(compiled, eager) and rel_err(eager, exact) < 0.05, seed
    ops = graphs[-1]
    assert ops.count("aten._scaled_grouped_mm.default") == 2, ops
    assert not any(op.startswith(("aten._grouped_mm", "aten.mm", "aten.bmm", "aten._local_scalar_dense"))
                   for op in ops), ops


# MARK: bad checkpoints


def _edit_config(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def ct_path(tmp_path):
    write_ct_checkpoint(tiny_model(0), tmp_path / "ct")
    return tmp_path / "ct"


@pytest.mark.parametrize("edit, message", [
    (lambda qc: qc.update(quant_method="gptq"), "compressed-tensors FP8 checkpoints only"),
    (lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(dynamic=False), "static activation"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4, type="int"), "8-bit float"),
    (lambda qc: qc.update(format="pack-quantized") or qc["config_groups"]["group_0"].update(format=None),
     "pack-quantized"),
])
def test_unsupported_quantization_config_is_refused(ct_path, edit, message):
    _edit_config(ct_path, edit)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(ct_path)


def test_missing_expert_piece_is_named(ct_path):
    from safetensors.torch import load_file

    tensors = load_file(str(ct_path / "model.safetensors"))
    del tensors["model.decoder.layers.1.experts.3.up_proj.weight"]
    save_file(tensors, str(ct_path / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=r"missing 1 tensor\(s\): model.decoder.layers.1.experts"
                                                         r".gate_up_proj$"):
        checkpoint.load(ct_path)


def test_fp8_tensor_of_an_ignored_module_is_refused(ct_path):
    _edit_config(ct_path, lambda qc: qc["ignore"].append("model.decoder.layers.0.self_attn.q_proj"))
    with pytest.raises(checkpoint.CheckpointError, match="layers.0.self_attn.q_proj.weight is FP8"):
        checkpoint.load(ct_path)


def test_bad_quantization_argument():
    with pytest.raises(ValueError, match="quantization must be fp8"):
        checkpoint.load(default_model_path(), quantization="int4")


# MARK: command line


def test_generate_and_serve_take_quantization_fp8(capsys):
    """`dgemma generate --quantization fp8` writes text; `dgemma serve --quantization fp8` builds an FP8 model."""
    from dgemma.cli import main
    from dgemma.server.cli import build, build_parser, config_from_args

    assert main(["generate", "ROMEO:", "--quantization", "fp8", "--seed", "0", "--max-new-tokens", "16",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completion_tokens"] == 16 and out["text"].strip()
    config = config_from_args(build_parser().parse_args(["--quantization", "fp8", "--no-memory-check"]))
    llm, _ = build(config)
    assert llm.model.layers[0].experts.down_proj.dtype == fp8.FP8


def test_export_quantization_fp8_writes_a_checkpoint_that_generates_as_quantise_on_load(tmp_path, capsys):
    """`dgemma export --quantization fp8` writes the compressed-tensors checkpoint with the tokenizer; loading it
    gives the tokens of quantising on load; exporting onto the source folder is refused."""
    from dgemma.cli import main

    assert main(["export", str(default_model_path()), str(tmp_path / "fp8"), "--quantization", "fp8"]) == 0
    assert (tmp_path / "fp8" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    params = SamplingParams(max_new_tokens=32, seed=1)
    exported = LLM(str(tmp_path / "fp8")).generate(["JULIET:"], params)[0]
    assert exported.token_ids == LLM(quantization="fp8").generate(["JULIET:"], params)[0].token_ids
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "fp8"), str(tmp_path / "fp8")])
    assert "refused" in capsys.readouterr().err


def test_gpu_generate_dry_run_in_fp8(tmp_path):
    """benchmarks/gpu_generate.py --quantization fp8 runs end to end (CPU dry run at tiny widths), with its weights
    and its bandwidth floor counted in FP8 bytes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_generate", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_generate.py")
    gpu_generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_generate)
    r = gpu_generate.main(["--device", "cpu", "--tiny", "--layers", "6", "--experts", "8", "--prompt", "32",
                           "--new-tokens", "32", "--steps", "2", "--batches", "1", "--peak-tbps", "0.05",
                           "--quantization", "fp8", "--out", str(tmp_path / "r.json")])
    bf16 = gpu_generate.materialise(gpu_generate.model_config(6, 8, tiny=True), "cpu")
    bf16_gb = sum(p.numel() * p.element_size() for p in bf16.parameters()) / 1e9
    assert r["quantization"] == "fp8" and r["batches"]["1"]["tokens"] == 32
    assert 0.5 * bf16_gb < r["weight_gb"] < 0.75 * bf16_gb
    assert r["bytes_per_step_all_experts_gb"] < gpu_generate.step_bytes(bf16) / 1e9


def test_memory_plan_counts_fp8_weights():
    """The serve-time memory plan charges an FP8 model its FP8 bytes: exactly the text model's parameters and
    buffers as loaded with quantization fp8, 0.5-0.65x the bf16 figure here; and for the released 26B-A4B config
    the FP8 weights fit a 32 GiB card, bf16 ones do not."""
    from dgemma.config import release_26b_a4b_text
    from dgemma.server import memory

    ck = checkpoint.load(default_model_path(), dtype="bfloat16", quantization="fp8")
    text = [t for n, t in list(ck.model.named_parameters()) + list(ck.model.named_buffers())
            if not n.startswith("vision")]
    want = sum(t.numel() * t.element_size() for t in text)
    assert fp8.weight_bytes(ck.config, torch.bfloat16) == want
    plans = {q: memory.check_checkpoint(default_model_path(), dtype="bfloat16", device="cpu", max_num_seqs=1,
                                        max_model_len=256, canvas_length=None, max_waiting=1, quantization=q)
             for q in (None, "fp8")}
    weights = {q: dict(p.parts)["weights"] for q, p in plans.items()}
    assert weights["fp8"] == want and 0.5 < weights["fp8"] / weights[None] < 0.65
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 256,
                                 "text_config": release_26b_a4b_text()})
    params = memory.count_parameters(cfg)
    fp8_bytes = fp8.weight_bytes(cfg, torch.bfloat16)
    for w, fits in ((None, False), (fp8_bytes, True)):
        p = memory.plan(cfg, torch.bfloat16, device="cuda", max_num_seqs=1, max_model_len=4096, params=params,
                        available=32 * memory.GiB, weight_bytes=w, batch_invariant=False)
        assert p.fits == fits
