"""HF checkpoint -> TurboMind-style workspace: the name table, the RoPE permute, QKV fusion, TP splits.

`deploy(model_name, model_path, dst_path, tp)` is the library entry point behind `python -m deploy`.
It checks everything it can before writing (template name, architecture, tp divisibility, every
required tensor and its shape, tokenizer files, destination), then converts one tensor at a time
into a temporary directory next to the destination and renames it into place at the end, so a
failure leaves nothing behind (deploy/tree.py owns the directory handling). Stale staging directories
of killed deploys to the same destination are removed first (and reported through `notes`).

Per tensor (docs/formats.md §1): cast to fp16 (refusing values fp16 cannot hold), transpose linear
weights from HF (out, in) to (in, out), interleave q/k channels for TurboMind's RoPE, fuse
[Q_r | K_r | V_r] per rank, split over TP ranks, zero-pad the vocab rows, write raw little-endian
fp16 with numpy `.tofile`. File names and per-rank shapes come from runtime.workspace.weight_table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploy.checkpoint import DeployError, HFCheckpoint, load_checkpoint
from deploy.kv_scales import import_kv_scales
from deploy.tree import build_tree, check_destination, clean_stale_staging, install, staging, tokenizer_files
from runtime import interrupts, kv_params
from runtime.templates import get_template
from runtime.workspace import WorkspaceConfig, WorkspaceError, padded_vocab, ranked, save_config, weight_table

FP16_MAX = 65504.0


@dataclass(frozen=True)
class Rule:
    """One workspace tensor and the HF tensors it is made from.

    `hf` pairs each HF name with its expected shape in symbolic dims (see `_dims`); `split` is how
    TP ranks get it: none (one file, no rank), vocab (one file, rows zero-padded to a multiple of
    tp), qkv (fuse per rank, then split the last dim), last / first (split that dim), copy (every
    rank gets all of it).
    """

    ws: str
    hf: tuple[tuple[str, tuple[str, ...]], ...]
    split: str = "none"
    transpose: bool = False  # linear weights: HF (out, in) -> workspace (in, out)
    needs_bias: bool = False  # only when the model has attention biases (attn_bias = 1)


L = "model.layers.{i}."
NAME_TABLE: tuple[Rule, ...] = (
    Rule("tok_embeddings.weight", (("model.embed_tokens.weight", ("vocab", "hidden")),), split="vocab"),
    Rule("norm.weight", (("model.norm.weight", ("hidden",)),)),
    Rule("output.weight", (("lm_head.weight", ("vocab", "hidden")),), split="vocab"),  # not transposed
    Rule("layers.{i}.attention_norm.weight", ((L + "input_layernorm.weight", ("hidden",)),)),
    Rule("layers.{i}.ffn_norm.weight", ((L + "post_attention_layernorm.weight", ("hidden",)),)),
    Rule(
        "layers.{i}.attention.w_qkv.weight",
        (
            (L + "self_attn.q_proj.weight", ("q", "hidden")),
            (L + "self_attn.k_proj.weight", ("kv", "hidden")),
            (L + "self_attn.v_proj.weight", ("kv", "hidden")),
        ),
        split="qkv",
        transpose=True,
    ),
    Rule(
        "layers.{i}.attention.w_qkv.bias",
        (
            (L + "self_attn.q_proj.bias", ("q",)),
            (L + "self_attn.k_proj.bias", ("kv",)),
            (L + "self_attn.v_proj.bias", ("kv",)),
        ),
        split="qkv",
        needs_bias=True,
    ),
    Rule(
        "layers.{i}.attention.wo.weight",
        ((L + "self_attn.o_proj.weight", ("hidden", "q")),),
        split="first",
        transpose=True,
    ),
    Rule("layers.{i}.attention.wo.bias", ((L + "self_attn.o_proj.bias", ("hidden",)),), split="copy", needs_bias=True),
    Rule(
        "layers.{i}.feed_forward.w1.weight",
        ((L + "mlp.gate_proj.weight", ("inter", "hidden")),),
        split="last",
        transpose=True,
    ),
    Rule(
        "layers.{i}.feed_forward.w3.weight",
        ((L + "mlp.up_proj.weight", ("inter", "hidden")),),
        split="last",
        transpose=True,
    ),
    Rule(
        "layers.{i}.feed_forward.w2.weight",
        ((L + "mlp.down_proj.weight", ("hidden", "inter")),),
        split="first",
        transpose=True,
    ),
)


@dataclass
class Job:
    """One workspace tensor to produce: its rule, layer-resolved names, and HF sources (None = zeros)."""

    rule: Rule
    ws: str
    sources: list[tuple[str | None, tuple[int, ...]]]


def permute_rope(w, num_heads: int, head_dim: int):
    """HF rotate_half order [x_0..x_{D/2-1} | x_{D/2}..x_{D-1}] -> TurboMind pairs [x0, x_{D/2}, x1, ...].

    Acts on the last dim of a q/k weight in (in, out) layout or a bias (out,):
    (..., heads, 2, D/2) -> transpose the last two -> (..., heads * D).
    """
    shape = w.shape
    return w.reshape(*shape[:-1], num_heads, 2, head_dim // 2).transpose(-1, -2).reshape(shape)


def fuse_qkv(q, k, v, tp: int):
    """Per-rank fusion: view each (..., out) as (..., tp, out/tp), concat on the last dim -> [Q_r K_r V_r]_r."""
    import torch

    lead = q.shape[:-1]
    return torch.cat([x.reshape(*lead, tp, -1) for x in (q, k, v)], dim=-1).reshape(*lead, -1)


def to_fp16(t, name: str):
    """Cast to fp16; refuse a tensor whose finite values do not fit (|x| > 65504 rounds to inf)."""
    import torch

    if t.dtype == torch.float16:
        return t
    dtype = str(t.dtype).removeprefix("torch.")
    h = t.to(torch.float16)
    if not torch.isfinite(h).all():
        src = t.float()
        if not torch.isfinite(src).all():
            raise DeployError(f"tensor {name} ({dtype}) already holds inf/nan; the checkpoint is damaged")
        raise DeployError(
            f"tensor {name} ({dtype}) has max |value| {src.abs().max().item():.6g} > {FP16_MAX:g} "
            "(fp16 max); it cannot be stored as fp16 weights"
        )
    return h


def build_config(ck: HFCheckpoint, model_name: str, tp: int) -> WorkspaceConfig:
    """config.ini [llama] for this checkpoint; upstream deploy values come from WorkspaceConfig defaults."""
    template = get_template(model_name)
    try:
        return WorkspaceConfig(
            model_name=model_name,
            head_num=ck.num_heads,
            kv_head_num=ck.num_kv_heads,
            size_per_head=ck.head_dim,
            vocab_size=ck.vocab_size,
            num_layer=ck.num_layers,
            rotary_embedding=ck.head_dim,
            rope_theta=ck.rope_theta,
            inter_size=ck.inter_size,
            norm_eps=ck.norm_eps,
            attn_bias=int(ck.qkv_bias or ck.o_bias),
            start_id=ck.bos_id,
            end_id=ck.eos_id,
            session_len=template.session_len + 8,
            tensor_para_size=tp,
            max_position_embeddings=ck.max_position_embeddings,
            use_dynamic_ntk=ck.use_dynamic_ntk,
        )
    except WorkspaceError as e:
        raise DeployError(f"{ck.path}: {e}") from None


def plan(ck: HFCheckpoint, cfg: WorkspaceConfig) -> list[Job]:
    """Resolve the name table for this model and check every HF tensor's presence and shape."""
    dims = {
        "vocab": ck.vocab_size,
        "hidden": ck.hidden_size,
        "q": ck.num_heads * ck.head_dim,
        "kv": ck.num_kv_heads * ck.head_dim,
        "inter": ck.inter_size,
    }
    jobs: list[Job] = []
    for rule in NAME_TABLE:
        if rule.needs_bias and not cfg.attn_bias:
            continue
        for i in range(cfg.num_layer) if "{i}" in rule.ws else [None]:
            sources = []
            for hf_name, sym in rule.hf:
                name = hf_name.format(i=i)
                if name == "lm_head.weight" and ck.tie_embeddings:
                    name = "model.embed_tokens.weight"
                if name.endswith("o_proj.bias") and not ck.o_bias:
                    name = None  # q/k/v biases only (Qwen2): the workspace's wo bias is zeros
                sources.append((name, tuple(dims[s] for s in sym)))
            jobs.append(Job(rule, rule.ws.format(i=i), sources))
    problems = []
    for job in jobs:
        for name, shape in job.sources:
            if name is None:
                continue
            if name not in ck.tensors:
                problems.append(f"missing tensor {name}")
            elif ck.tensors.index[name].shape != shape:
                info = ck.tensors.index[name]
                problems.append(f"tensor {name} in {info.file.name} has shape {info.shape}, expected {shape}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DeployError(
            f"{ck.path} ({ck.architecture}): {'; '.join(problems[:5])}{more}; "
            "the checkpoint is incomplete or does not match config.json"
        )
    produced = {n for job in jobs for n in _outputs(job, cfg.tensor_para_size)}
    expected = set(weight_table(cfg))
    if produced != expected:  # the name table and runtime.workspace.weight_table must agree
        raise DeployError(f"internal: name table disagrees with weight_table: {sorted(produced ^ expected)[:5]}")
    return jobs


def _outputs(job: Job, tp: int) -> list[str]:
    return [job.ws] if job.rule.split in ("none", "vocab") else [ranked(job.ws, r) for r in range(tp)]


def convert_job(job: Job, ck: HFCheckpoint, cfg: WorkspaceConfig) -> dict[str, np.ndarray]:
    """The workspace arrays (file name -> fp16 array, per-rank shape) of one job."""
    import torch

    tp, D = cfg.tensor_para_size, cfg.size_per_head
    ts = [
        to_fp16(ck.tensors.get(name), name) if name else torch.zeros(shape, dtype=torch.float16)
        for name, shape in job.sources
    ]
    if job.rule.transpose:
        ts = [t.t() for t in ts]  # (out, in) -> (in, out)
    split = job.rule.split
    if split == "qkv":
        q, k, v = ts
        fused = fuse_qkv(permute_rope(q, cfg.head_num, D), permute_rope(k, cfg.kv_head_num, D), v, tp)
        parts = fused.chunk(tp, dim=-1)
    elif split == "last":
        parts = ts[0].chunk(tp, dim=-1)
    elif split == "first":
        parts = ts[0].chunk(tp, dim=0)
    elif split == "copy":
        parts = [ts[0]] * tp
    elif split == "vocab":  # (vocab, hidden) -> (padded_vocab, hidden), zero rows at the end
        w = ts[0]
        pad = padded_vocab(cfg) - w.shape[0]
        parts = [torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w]
    else:
        parts = [ts[0]]
    return {
        name: np.ascontiguousarray(p.numpy(), dtype="<f2") for name, p in zip(_outputs(job, tp), parts, strict=True)
    }


def write_weights(jobs: list[Job], ck: HFCheckpoint, cfg: WorkspaceConfig, wdir: Path, progress: bool = True) -> None:
    """Convert and write one job at a time (memory: the largest tensor, a few times over)."""
    from tqdm import tqdm

    table = weight_table(cfg)
    for job in tqdm(jobs, desc="deploy", unit="tensor", disable=not progress):
        for name, arr in convert_job(job, ck, cfg).items():
            if arr.shape != table[name]:
                raise DeployError(f"internal: {name} came out {arr.shape}, weight_table says {table[name]}")
            arr.tofile(wdir / name)


def check_tp(ck: HFCheckpoint, tp: int) -> None:
    """tp must divide heads, kv heads and inter_size (and be positive); say all three numbers."""
    counts = {
        "num_attention_heads": ck.num_heads,
        "num_key_value_heads": ck.num_kv_heads,
        "intermediate_size": ck.inter_size,
    }
    if tp < 1 or any(n % tp for n in counts.values()):
        listed = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise DeployError(f"--tp {tp} must be a positive divisor of {listed}; choose a tp that divides all three")


def deploy(
    model_name: str,
    model_path: str | os.PathLike,
    dst_path: str | os.PathLike = "./workspace",
    tp: int = 1,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    notes: Callable[[str], None] | None = None,
) -> Path:
    """Convert an HF checkpoint into a workspace at `dst_path`; returns the workspace path.

    `notes` receives things worth telling the user (e.g. a list-valued eos_token_id).
    """
    try:
        template = get_template(model_name)
    except ValueError as e:
        raise DeployError(str(e)) from None
    ck = load_checkpoint(model_path)
    for text in ck.notes if notes else ():
        notes(text)
    check_tp(ck, tp)
    cfg = build_config(ck, model_name, tp)
    if ck.sliding_window is not None and ck.sliding_window < cfg.session_len:
        raise DeployError(
            f"{ck.path}/config.json: sliding_window {ck.sliding_window} < session_len "
            f"{cfg.session_len} (template {template.name}); sliding-window attention is not supported"
        )
    jobs = plan(ck, cfg)
    cfg, kv_scales = import_kv_scales(ck, cfg)  # FP8 KV scales the checkpoint carries (None: none)
    tok_files = tokenizer_files(Path(tokenizer_path) if tokenizer_path else ck.path)
    dst = check_destination(Path(dst_path), force)
    for text in clean_stale_staging(dst):  # removes only our own staging dirs whose process is gone
        if notes:
            notes(text)
    with staging(dst) as tmp:
        wdir = build_tree(tmp, tp, tok_files)
        write_weights(jobs, ck, cfg, wdir, progress)
        if kv_scales:
            kv_params.write(wdir, cfg, kv_scales.params)
        save_config(cfg, wdir)
        with interrupts.held():  # the workspace is installed and recorded as written, or neither
            install(tmp, dst)
            interrupts.record(str(dst))
    if kv_scales and notes:
        notes(f"imported {kv_scales.summary()}; config.ini selects kv_cache_dtype {cfg.kv_cache_dtype}")
    return dst
