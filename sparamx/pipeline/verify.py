"""Packed model vs the masked dense model on real text: logits agreement and, per
linear layer, the error of the packed kernel's output against ``nn.Linear``'s."""

from __future__ import annotations

import torch
from torch import nn

from ..artifact import atomic_write_json
from ..layers import SparseLinear
from .runstate import StageResult

VERIFY_TEXT_TOKENS = 256
VERIFY_REL_TOL = 0.05  # relative L2 error of logits, packed vs masked dense, in bf16
VERIFY_TOP1 = 0.9  # fraction of positions whose argmax token agrees


def verification_text() -> str:
    """Real news text (lee_background.cor, first articles)."""
    from ..assets import gensim_text

    lines = gensim_text("lee_background.cor").read_text(encoding="utf-8").splitlines()
    return " ".join(lines[:3])


def compare_models(
    reference: nn.Module, packed: nn.Module, tokenizer, tokens: int, text: str | None = None
) -> dict:
    """Run both models on the same tokens; return logits errors and per-layer errors.

    Per-layer errors compare each ``SparseLinear``'s output with the reference model's
    ``nn.Linear`` of the same name *on the reference's own input*, so an error shows
    up at the layer that makes it, not downstream of it."""
    ids = tokenizer(text or verification_text(), return_tensors="pt")["input_ids"][:, :tokens]
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    ref_mods = dict(reference.named_modules())
    for name, mod in packed.named_modules():
        if isinstance(mod, SparseLinear) and isinstance(ref_mods.get(name), nn.Linear):

            def hook(m, args, out, name=name):
                captured[name] = (args[0].detach(), out.detach())

            hooks.append(ref_mods[name].register_forward_hook(hook))
    try:
        with torch.inference_mode():
            ref_logits = reference(ids).logits.float()
            packed_logits = packed(ids).logits.float()
            layers = []
            pmods = dict(packed.named_modules())
            for name, (x, y_ref) in captured.items():
                y = pmods[name](x).float()
                y_ref = y_ref.float()
                diff = (y - y_ref).norm() / y_ref.norm().clamp_min(1e-12)
                layers.append(
                    {"name": name, "max_abs": float((y - y_ref).abs().max()), "rel_l2": float(diff)}
                )
    finally:
        for h in hooks:
            h.remove()
    d = packed_logits - ref_logits
    return {
        "tokens": int(ids.shape[1]),
        "logits_max_abs": float(d.abs().max()),
        "logits_rel_l2": float(d.norm() / ref_logits.norm()),
        "top1_agreement": float((packed_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        "layers": layers,
        "worst_layer_rel_l2": max((r["rel_l2"] for r in layers), default=0.0),
    }


def dequantize_into(reference: nn.Module, packed: nn.Module) -> int:
    """Give every ``nn.Linear`` of ``reference`` whose counterpart in ``packed`` is int8
    the weight that layer holds (``q * scale``, in the reference's dtype); returns how
    many. A new parameter, not a copy into the old one: a head tied to the embedding
    must not change the reference's embedding (the packed model keeps it as it was)."""
    ref_mods = dict(reference.named_modules())
    changed = 0
    for name, mod in packed.named_modules():
        ref = ref_mods.get(name)
        if isinstance(mod, SparseLinear) and mod.packed.is_int8 and isinstance(ref, nn.Linear):
            w = mod.packed.unpack(torch.float32).to(ref.weight.dtype)
            ref.weight = nn.Parameter(w, requires_grad=False)
            changed += 1
    return changed


def verify_against_checkpoint(
    artifact, source, dtype: str = "bfloat16", rows: int = 4, seed: int = 0
) -> dict:
    """The streaming run's check, one linear at a time (no dense model in RAM): each
    packed weight holds the source checkpoint's values where it keeps any (exactly, or
    for int8 within half a quantization step: :func:`kept_weights_match`), and
    the packed kernel's output on random inputs matches ``F.linear`` on the unpacked
    weight."""
    from tqdm.auto import tqdm

    from ..artifact import load
    from ..models import parse_dtype
    from .streaming import SafetensorsCheckpoint

    model, _ = load(artifact)
    ckpt = SafetensorsCheckpoint(source)
    dtype = parse_dtype(dtype)
    # A head tied to the embeddings has no tensor of its own in the source: it was packed
    # from the embedding's (shared with it as a PackedEmbedding, or not: an int8 head).
    source_of = {head: emb for emb, head in model.sparamx_manifest["packed_embeddings"].items()}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(head, SparseLinear) and f"{names[id(head)]}.weight" not in ckpt.weight_map:
        source_of.setdefault(names[id(head)], names[id(emb)])
    gen = torch.Generator().manual_seed(seed)
    layers = []
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    with torch.inference_mode():
        for name, mod in tqdm(packed, desc="verify", unit="linear"):
            key = source_of.get(name, name) + ".weight"
            w_src = ckpt.read([key], dtype)[key]
            w, kept, match = kept_weights_match(mod.packed, w_src)
            x = torch.randn(rows, mod.in_features, generator=gen).to(torch.bfloat16)
            y = mod(x).float()
            y_ref = x.float() @ w.float().T
            if mod.bias is not None:
                y_ref = y_ref + mod.bias.float()
            diff = (y - y_ref).norm() / y_ref.norm().clamp_min(1e-12)
            layers.append(
                {
                    "name": name,
                    "weights_match": match,
                    "sparsity": 1 - int(kept.sum()) / kept.numel(),
                    "max_abs": float((y - y_ref).abs().max()),
                    "rel_l2": float(diff),
                }
            )
            del w, w_src, kept
    return {
        "mode": "streaming: packed weights vs source checkpoint, kernel vs F.linear",
        "rows": rows,
        "weights_match": all(r["weights_match"] for r in layers),
        "worst_layer_rel_l2": max((r["rel_l2"] for r in layers), default=0.0),
        "layers": layers,
    }


def kept_weights_match(packed, w_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Whether ``packed`` holds the source weight's values where it keeps any: exactly
    (bf16 storages: the source rounded to bf16), or within half a quantization step
    (int8: ``q = round(w / scale)``, from the source as read). Returns the unpacked
    weight (fp32 for int8: what the kernels multiply by), the keep mask, the verdict."""
    if not packed.is_int8:
        w = packed.unpack()
        kept = w != 0
        return w, kept, bool(torch.equal(w[kept], w_src.to(torch.bfloat16)[kept]))
    w, kept = packed.unpack(torch.float32), packed.kept()
    err = (w - w_src.float()).abs()[kept]
    # half a step, plus fp32's rounding of w / scale and of q * scale
    match = bool((err <= packed.weight_scales()[kept] * (0.5 + 1e-5)).all())
    return w, kept, match


# ------------------------------------------------------------------ the stage


def run_stage(pipe) -> StageResult:
    if pipe.streaming:
        return _run_stage_streaming(pipe)
    from ..artifact import load

    # Both in the compute dtype: the packed model as eval-packed and bench run it.
    packed, tok = load(pipe.path("pack", "artifact"), dtype=pipe.compute_dtype)
    masked, _ = pipe.pruned_model()
    rep = compare_models(masked, packed, tok, VERIFY_TEXT_TOKENS)
    unquantized = None
    if dequantize_into(masked, packed):
        # int8 layers: the criteria judge the kernels against the weights the artifact
        # holds (q * scale); the quantization's own effect is reported beside them.
        unquantized = {k: rep[k] for k in ("logits_rel_l2", "logits_max_abs", "top1_agreement")}
        rep = compare_models(masked, packed, tok, VERIFY_TEXT_TOKENS)
        rep["reference"] = "masked dense, int8 layers dequantized"
        rep["vs_unquantized"] = unquantized
    ok = rep["logits_rel_l2"] <= VERIFY_REL_TOL and rep["top1_agreement"] >= VERIFY_TOP1
    rep["compute_dtype"] = pipe.compute.resolved
    rep["passed"] = ok
    rep["criteria"] = {"logits_rel_l2_max": VERIFY_REL_TOL, "top1_min": VERIFY_TOP1}
    atomic_write_json(pipe.path("verify", "verify.json"), rep)
    summary = (
        f"logits rel. L2 error {rep['logits_rel_l2']:.2e}, max abs "
        f"{rep['logits_max_abs']:.3g}, top-1 agreement {rep['top1_agreement']:.1%}"
    )
    if unquantized:
        u = unquantized
        summary += (
            f" (int8 dequantized; vs the unquantized masked model {u['logits_rel_l2']:.2e}, "
            f"top-1 {u['top1_agreement']:.1%})"
        )
    if not ok:
        worst = sorted(rep["layers"], key=lambda r: -r["rel_l2"])[:10]
        table = "\n".join(
            f"  {r['name']}: max abs {r['max_abs']:.3g}, rel {r['rel_l2']:.3g}" for r in worst
        )
        raise RuntimeError(f"verify failed: {summary}\nworst layers:\n{table}")
    return StageResult(["verify/verify.json"], summary)


def _run_stage_streaming(pipe) -> StageResult:
    rep = verify_against_checkpoint(
        pipe.path("pack", "artifact"), pipe.source_dir(), pipe.cfg.model.dtype
    )
    ok = rep["weights_match"] and rep["worst_layer_rel_l2"] <= VERIFY_REL_TOL
    rep["passed"] = ok
    rep["criteria"] = {"weights_match": True, "layer_rel_l2_max": VERIFY_REL_TOL}
    atomic_write_json(pipe.path("verify", "verify.json"), rep)
    agree = "match" if rep["weights_match"] else "DIFFER FROM"
    summary = (
        f"{len(rep['layers'])} packed linears: weights {agree} the source where kept; "
        f"kernel vs torch worst rel. L2 {rep['worst_layer_rel_l2']:.2e}"
    )
    if not ok:
        bad = [r for r in rep["layers"] if not r["weights_match"]][:5]
        worst = sorted(rep["layers"], key=lambda r: -r["rel_l2"])[:5]
        raise RuntimeError(f"verify failed: {summary}\nmismatched: {bad}\nworst: {worst}")
    return StageResult(["verify/verify.json"], summary)
