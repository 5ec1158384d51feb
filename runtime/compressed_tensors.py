"""HF checkpoints that carry FP8 KV-cache scales (compressed-tensors): the only writer and reader of that format.

What vLLM (`--kv-cache-dtype fp8`) and LLM Compressor use, per layer i:

    config.json  "quantization_config": {
        "quant_method": "compressed-tensors", "format": "dense",   # dense: the weights are not quantized
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor" | "attn_head",
                            "dynamic": false, "symmetric": true},
        "quantization_status": "frozen", "config_groups": {}, "ignore": [], "version": CT_VERSION}
    model.layers.{i}.self_attn.k_scale, .v_scale     float32, [1] (tensor) or [kv_heads, 1, 1] (attn_head)

The scale is ours (runtime.quant): FP8 E4M3 scale = amax / 448, x^ = fp8(x / scale) * scale, symmetric (no
zero point). Our granularity `tensor` is strategy `tensor` (one scale per layer), `head` is `attn_head`.
Heads are in HF order and K is observed after RoPE (lite.stats); a per-tensor or per-head amax is a max over
the head's channels, so TurboMind's interleaved channel order (deploy's RoPE permute) does not change it and
nothing has to be undone. A per-channel scale would have to be permuted back; there is none in this format.

Export (`export_checkpoint`, CLI lite.export): copies the source checkpoint, weights bit for bit, and appends
each layer's two scales to the safetensors shard that holds that layer's k_proj weight (the shard's header is
rewritten, its data bytes copied unchanged; sharding and the index follow the source).

Import (`read_kv_scales`, used by deploy): accepts the k_scale / v_scale tensors above, the older
compressed-tensors names k_proj.output_scale / v_proj.output_scale, or one model.layers.{i}.self_attn.kv_scale
(used for K and V, as vLLM does), and returns them as runtime.kv_params.KVParams for FP8 E4M3. Schemes we
cannot honour (dynamic, other bit widths, integer, asymmetric, other strategies, quantized weights) are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.kv_params import KVParams
from runtime.quant import FP8_MAX

QUANT_METHOD = "compressed-tensors"
FORMAT = "dense"  # compressed-tensors' name for unquantized weights (a KV-cache-only checkpoint)
STATUS = "frozen"  # calibrated, observers removed: what LLM Compressor writes for static scales
# The compressed-tensors release whose QuantizationConfig the tests parse this config with (setup.py [dev]
# pins it); readers record it but do not act on it.
CT_VERSION = "0.20.1"
KV_DTYPE = "fp8_e4m3"  # compressed-tensors' 8-bit float is E4M3 (its FP8_E4M3_DATA); vLLM's kv_cache_dtype fp8
STRATEGIES = {"tensor": "tensor", "head": "attn_head"}  # our granularity -> compressed-tensors strategy
GRANULARITY = {v: k for k, v in STRATEGIES.items()}

SCALE = "model.layers.{i}.self_attn.{kv}_scale"  # kv = k | v
# Every per-layer KV scale name we read; group 2 says which of K, V (or both) the tensor scales.
SCALE_NAME = re.compile(
    r"model\.layers\.(\d+)\.self_attn\.(k_scale|v_scale|k_proj\.output_scale|v_proj\.output_scale|kv_scale)"
)
STYLES = {  # tensor-name suffix -> (style shown to the user, which of K/V it gives)
    "k_scale": ("k_scale / v_scale", "k"),
    "v_scale": ("k_scale / v_scale", "v"),
    "k_proj.output_scale": ("legacy k_proj.output_scale / v_proj.output_scale", "k"),
    "v_proj.output_scale": ("legacy k_proj.output_scale / v_proj.output_scale", "v"),
    "kv_scale": ("single kv_scale (used for K and V)", "kv"),
}
INDEX = "model.safetensors.index.json"
# Other weight formats are not copied: they would be stale copies of the weights without the scales.
OTHER_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.bin.index.json")


class CompressedTensorsError(ValueError):
    """A checkpoint or KV parameters that this format cannot carry; the message names the file/key and the fix."""


# ---------------------------------------------------------------------------------------------
# Names, config.json and the scale tensors


def is_kv_scale(name: str) -> bool:
    """True for a per-layer KV-cache scale tensor (any name `read_kv_scales` reads), not a model weight."""
    return SCALE_NAME.fullmatch(name) is not None


def read_config(model: Path) -> dict:
    """config.json of HF checkpoint directory `model`, parsed."""
    path = model / "config.json"
    if not path.is_file():
        raise CompressedTensorsError(f"no config.json in {model}; pass an HF checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompressedTensorsError(f"{path}: cannot read JSON ({e}); fix or re-download the file") from None
    if not isinstance(config, dict):
        raise CompressedTensorsError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def kv_cache_scheme(granularity: str) -> dict:
    """compressed-tensors QuantizationArgs of a static, symmetric FP8 E4M3 KV cache."""
    return {"num_bits": 8, "type": "float", "strategy": STRATEGIES[granularity], "dynamic": False, "symmetric": True}


def quantization_config(granularity: str) -> dict:
    """config.json `quantization_config` for a checkpoint whose only quantization is the KV cache."""
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "kv_cache_scheme": kv_cache_scheme(granularity),
        "quantization_status": STATUS,
        "config_groups": {},
        "ignore": [],
        "version": CT_VERSION,
    }


def check_exportable(params: KVParams) -> None:
    """vLLM reads compressed-tensors KV scales only as symmetric float8 E4M3; refuse anything else."""
    fix = "export FP8 E4M3 instead: --kv-dtype fp8_e4m3 (scale = absmax / 448, symmetric)"
    if params.kv_dtype == "int8":
        raise CompressedTensorsError(
            "INT8 KV parameters cannot be exported: vLLM accepts only symmetric float8 KV-cache scales "
            f"(kv_cache_scheme type float, num_bits 8, kv_cache_dtype fp8); {fix}"
        )
    if params.kv_dtype != KV_DTYPE:
        raise CompressedTensorsError(
            f"{params.kv_dtype} KV parameters cannot be exported: compressed-tensors' 8-bit float is E4M3 and "
            f"vLLM's fp8_e5m2 cache takes no scales; {fix}"
        )
    if (params.k_zp != 0).any() or (params.v_zp != 0).any():
        raise CompressedTensorsError(
            "asymmetric KV parameters (nonzero zero points) cannot be exported: vLLM accepts only symmetric "
            f"float8 KV-cache scales; {fix}"
        )


def scale_tensors(params: KVParams) -> dict[str, torch.Tensor]:
    """name -> float32 scale, [1] per layer (tensor) or [kv_heads, 1, 1] (head), in layer order (K, V)."""
    check_exportable(params)
    out: dict[str, torch.Tensor] = {}
    for i in range(params.k_scale.shape[0]):
        for kv, scale in (("k", params.k_scale[i]), ("v", params.v_scale[i])):  # each (kv_heads,)
            scale = scale.to(torch.float32)
            if params.granularity == "tensor":
                if not torch.all(scale == scale[0]):
                    raise ValueError(f"layer {i}: per-tensor {kv} scales differ across heads: {scale.tolist()}")
                out[SCALE.format(i=i, kv=kv)] = scale[:1].clone()
            else:
                out[SCALE.format(i=i, kv=kv)] = scale.reshape(-1, 1, 1).clone()
    return out


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportResult:
    out: Path
    files: list[str]  # what was written, relative to out
    scale_files: dict[str, int]  # shard -> number of scale tensors appended to it


def model_dims(config: dict, config_file: Path) -> tuple[int, int]:
    """(num_hidden_layers, num_key_value_heads) of an HF LLaMA-family config."""
    try:
        layers = int(config["num_hidden_layers"])
        kv_heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as e:
        raise CompressedTensorsError(f"{config_file}: missing or bad {e}; is this a complete HF config?") from None
    return layers, kv_heads


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts): an 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        size = path.stat().st_size
        if not 0 < n <= size - 8:
            raise CompressedTensorsError(f"{path}: not a safetensors file (header length {n}); re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CompressedTensorsError(f"{path}: unreadable safetensors header ({e}); re-download it") from None
    return header, 8 + n


def append_tensors(src: Path, dst: Path, extra: dict[str, torch.Tensor], advance: Callable[[int], object]) -> None:
    """Copy safetensors `src` to `dst` with float32 tensors `extra` added after the existing data.

    The header gets the new entries (data_offsets past the old end) and is re-padded with spaces to a
    multiple of 8 bytes; the old data bytes are copied unchanged, so every weight stays bit-identical.
    `advance(n)` is called as bytes are copied (progress).
    """
    if not extra:  # a shard without scales is copied byte for byte, header included
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            _copy(fin, fout, advance)
        return
    header, start = read_safetensors_header(src)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if start + end != src.stat().st_size:
        raise CompressedTensorsError(
            f"{src}: data ends at byte {start + end} but the file has {src.stat().st_size}; re-download it"
        )
    blobs = []
    for name, t in extra.items():
        if name in tensors:
            raise CompressedTensorsError(f"{src} already holds {name}; export from a checkpoint without KV scales")
        blob = t.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [end, end + len(blob)]}
        end += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(raw)) + raw)
        fin.seek(start)
        advance(start)  # the old header, replaced by the new one
        _copy(fin, fout, advance)
        fout.write(b"".join(blobs))


def _copy(fin, fout, advance: Callable[[int], object]) -> None:
    """The rest of `fin` into `fout` in 16 MiB chunks (memory stays flat for multi-GB shards)."""
    while chunk := fin.read(16 << 20):
        fout.write(chunk)
        advance(len(chunk))


def _safetensors_files(model: Path) -> tuple[list[Path], dict | None]:
    """The source's safetensors files (from the index when there is one) and the parsed index."""
    index_file = model / INDEX
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CompressedTensorsError(f"{index_file}: cannot read JSON ({e}); re-download the file") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CompressedTensorsError(f"{index_file}: no weight_map; re-download the checkpoint")
        files = [model / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CompressedTensorsError(f"{index_file} lists missing shards {', '.join(missing)}; download them")
        return files, index
    files = sorted(model.glob("*.safetensors"))
    if not files:
        raise CompressedTensorsError(
            f"no *.safetensors in {model}: the export copies safetensors weights only; convert the checkpoint "
            "first (AutoModelForCausalLM.from_pretrained(...).save_pretrained(DIR))"
        )
    return files, None


def export_checkpoint(
    model: str | os.PathLike,
    out: str | os.PathLike,
    params: KVParams,
    *,
    progress: bool = True,
) -> ExportResult:
    """Write HF checkpoint `out` = `model` + FP8 KV scales `params` + config.json quantization_config.

    Everything is checked first, then written into a temporary directory beside `out` and renamed into
    place, so a failure leaves nothing behind. `out` must not exist or be an empty directory.
    """
    from tqdm import tqdm

    model, out = Path(model), Path(out).absolute()
    if not model.is_dir():
        raise CompressedTensorsError(f"model path {model} is not a directory; pass an HF checkpoint directory")
    scales = scale_tensors(params)  # refuses INT8 / E5M2 / asymmetric parameters
    config = read_config(model)
    config_file = model / "config.json"
    if "quantization_config" in config:
        qc = config["quantization_config"]
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CompressedTensorsError(
            f"{config_file} already has a quantization_config (quant_method {method!r}); export from the "
            "unquantized checkpoint the stats were calibrated on"
        )
    layers, kv_heads = model_dims(config, config_file)
    if tuple(params.k_scale.shape) != (layers, kv_heads):
        L, H = params.k_scale.shape
        raise CompressedTensorsError(
            f"the KV parameters cover {L} layers x {H} kv heads but {config_file} has num_hidden_layers {layers}, "
            f"kv heads {kv_heads}: the stats come from a different model; re-run python -m lite.calibrate "
            f"--model {model} --work-dir W"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressedTensorsError(f"output {out} exists and is not an empty directory; choose another --out")

    files, index = _safetensors_files(model)
    where: dict[str, Path] = {}  # tensor name -> its file (read from the headers, the ground truth)
    for f in files:
        for name in read_safetensors_header(f)[0]:
            if name != "__metadata__":
                where[name] = f
    present = sorted(n for n in where if is_kv_scale(n))
    if present:
        raise CompressedTensorsError(
            f"{model} already carries KV scales ({present[0]}, ...); export from the checkpoint without them"
        )
    per_file: dict[Path, dict[str, torch.Tensor]] = {f: {} for f in files}
    for i in range(layers):  # a layer's scales go into the shard holding its k_proj weight
        anchor = f"model.layers.{i}.self_attn.k_proj.weight"
        if anchor not in where:
            raise CompressedTensorsError(f"{model}: no tensor {anchor} in its safetensors files; not a LLaMA layout")
        for kv in ("k", "v"):
            name = SCALE.format(i=i, kv=kv)
            per_file[where[anchor]][name] = scales[name]

    others = [
        f
        for f in sorted(model.iterdir())
        if f.is_file()
        and not f.name.startswith(".")
        and f.suffix != ".safetensors"
        and f.name not in ("config.json", INDEX)
        and not any(f.match(p) for p in OTHER_WEIGHTS)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        for f in others:  # tokenizer, generation_config.json, chat template, README, ...
            shutil.copy2(f, tmp / f.name)
        total = sum(f.stat().st_size for f in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="copy weights", disable=not progress) as bar:
            for f in files:
                append_tensors(f, tmp / f.name, per_file[f], bar.update)
        if index is not None:
            added = sum(4 * t.numel() for t in scales.values())
            index = dict(index)
            placed = {n: f.name for f, extra in per_file.items() for n in extra}
            index["weight_map"] = {**index["weight_map"], **placed}
            if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
                index["metadata"] = {**index["metadata"], "total_size": index["metadata"]["total_size"] + added}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config = {**config, "quantization_config": quantization_config(params.granularity)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        written = sorted(p.name for p in tmp.iterdir())
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the checkpoint gets the usual directory mode
        if out.is_dir():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return ExportResult(out, written, {f.name: len(v) for f, v in per_file.items() if v})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# Import


@dataclass
class ImportedScales:
    """KV scales read from a checkpoint, as FP8 E4M3 KVParams (each tensor (num_layer, kv_heads), fp32)."""

    params: KVParams
    style: str  # which tensor names they came from
    scheme: str  # what config.json declared

    def summary(self) -> str:
        p = self.params

        def span(t: torch.Tensor) -> str:
            return f"{t.min().item():.6g}..{t.max().item():.6g}"

        return (
            f"FP8 E4M3 KV scales for {p.k_scale.shape[0]} layers, {p.granularity} granularity, from {self.style} "
            f"({self.scheme}); k_scale {span(p.k_scale)}, v_scale {span(p.v_scale)}"
        )


def _declared_strategy(config: dict, config_file: Path, has_scales: bool) -> str | None:
    """The KV strategy config.json declares ('tensor' | 'attn_head'), or None when it declares no KV scheme.

    Raises on a scheme we cannot honour, and on a config that contradicts the presence of scale tensors.
    """
    qc = config.get("quantization_config")
    if qc is None:
        return None
    where = f"{config_file} quantization_config"
    if not isinstance(qc, dict):
        raise CompressedTensorsError(f"{where} is {type(qc).__name__}, expected an object; fix config.json")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        if has_scales:
            raise CompressedTensorsError(
                f"{where}: quant_method {method!r}; deploy imports KV scales only from compressed-tensors "
                "checkpoints with unquantized weights (or ones without a quantization_config)"
            )
        return None
    if qc.get("config_groups"):
        raise CompressedTensorsError(
            f"{where}: config_groups {sorted(qc['config_groups'])} quantize weights or activations, which the "
            "workspace cannot hold (fp16 weights only); deploy the unquantized checkpoint"
        )
    scheme = qc.get("kv_cache_scheme")
    if scheme is None:
        if has_scales:
            raise CompressedTensorsError(
                f"{where}: kv_cache_scheme is null but the checkpoint holds KV scale tensors; add the scheme "
                '(e.g. {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": false, '
                '"symmetric": true}) or remove the tensors'
            )
        return None
    if not isinstance(scheme, dict):
        raise CompressedTensorsError(f"{where}.kv_cache_scheme is {scheme!r}, expected an object; fix config.json")
    # compressed-tensors' QuantizationArgs defaults: num_bits 8, type int, symmetric, static, strategy tensor.
    checks = {
        "num_bits": (scheme.get("num_bits", 8) == 8, "only 8-bit KV caches are supported"),
        "type": (scheme.get("type", "int") == "float", "only float (FP8 E4M3) KV scales are imported"),
        "symmetric": (scheme.get("symmetric", True) is True, "FP8 KV scales are symmetric (no zero point)"),
        "dynamic": (
            scheme.get("dynamic", False) is False,
            "dynamic scales are computed at run time, so there are none to import; remove kv_cache_scheme and "
            "use --calculate-kv-scales (runtime) or python -m lite.calibrate + lite.kv_qparams",
        ),
        "strategy": (scheme.get("strategy", "tensor") in GRANULARITY, f"supported: {', '.join(GRANULARITY)}"),
    }
    for key, (ok, why) in checks.items():
        if not ok:
            raise CompressedTensorsError(
                f"{where}.kv_cache_scheme: {key} = {json.dumps(scheme.get(key))} cannot be honoured: {why}"
            )
    return scheme.get("strategy", "tensor")


def read_kv_scales(
    model: str | os.PathLike,
    names: Iterable[str],
    get: Callable[[str], torch.Tensor],
    num_layers: int,
    kv_heads: int,
) -> ImportedScales | None:
    """KV scales of an HF checkpoint as FP8 E4M3 KVParams, or None when it declares and holds none.

    `names` are the checkpoint's tensor names and `get(name)` reads one. Without a quantization_config,
    scale tensors are taken as vLLM takes them: static symmetric E4M3 scales, granularity from their shape.
    """
    model = Path(model)
    config_file = model / "config.json"
    found: dict[tuple[int, str], str] = {}  # (layer, k | v | kv) -> tensor name
    styles: set[str] = set()
    for name in names:
        m = SCALE_NAME.fullmatch(name)
        if m:
            style, which = STYLES[m.group(2)]
            found[int(m.group(1)), which] = name
            styles.add(style)
    declared = _declared_strategy(read_config(model), config_file, bool(found))
    if not found:
        if declared is None:
            return None
        raise CompressedTensorsError(
            f"{config_file} declares static KV-cache scales (kv_cache_scheme strategy {declared}) but the "
            f"weights hold none (expected {SCALE.format(i=0, kv='k')} and .v_scale per layer); export the "
            "checkpoint with its scales or remove kv_cache_scheme"
        )
    if len(styles) > 1:
        raise CompressedTensorsError(f"{model} mixes KV scale styles ({'; '.join(sorted(styles))}); keep one")
    (style,) = styles
    beyond = sorted(name for (i, _), name in found.items() if i >= num_layers)
    if beyond:
        raise CompressedTensorsError(f"{model}: {beyond[0]} is beyond the model's {num_layers} layers; remove it")

    want = GRANULARITY.get(declared)  # None: decided by the tensors' shape
    rows: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    granularities: set[str] = set()
    for i in range(num_layers):
        for kv in ("k", "v"):
            name = found.get((i, "kv")) or found.get((i, kv))
            if name is None:
                raise CompressedTensorsError(
                    f"{model}: {_expected_name(style, i, kv)} is missing ({style} found for other layers); "
                    "every layer needs K and V scales"
                )
            t = get(name)
            granularities.add(_granularity(t, name, kv_heads, want, model))
            rows[kv].append(_check_values(t, name, model).reshape(-1).expand(kv_heads))  # (kv_heads,)
    if len(granularities) > 1:
        raise CompressedTensorsError(
            f"{model}: KV scale tensors mix per-tensor [1] and per-head [{kv_heads}, 1, 1] shapes; use one"
        )
    k, v = torch.stack(rows["k"]), torch.stack(rows["v"])  # (num_layers, kv_heads)
    params = KVParams(KV_DTYPE, granularities.pop(), k, torch.zeros_like(k), v, torch.zeros_like(v))
    scheme = (
        f"kv_cache_scheme strategy {declared}" if declared else "no quantization_config: static E4M3, as vLLM reads it"
    )
    return ImportedScales(params, style, scheme)


def _expected_name(style: str, i: int, kv: str) -> str:
    """The name layer i's K or V scale has in `style` (for the message about a missing one)."""
    if style == STYLES["kv_scale"][0]:
        return f"model.layers.{i}.self_attn.kv_scale"
    if style == STYLES["k_proj.output_scale"][0]:
        return f"model.layers.{i}.self_attn.{kv}_proj.output_scale"
    return SCALE.format(i=i, kv=kv)


def _granularity(t: torch.Tensor, name: str, kv_heads: int, want: str | None, model: Path) -> str:
    """'tensor' for shape [] / [1], 'head' for [kv_heads, 1, 1] / [kv_heads]; `want` breaks the tie at 1 kv head."""
    shape = tuple(t.shape)
    per_tensor = shape in ((), (1,))
    per_head = shape in ((kv_heads, 1, 1), (kv_heads,))
    if want == "tensor" and per_tensor or want == "head" and per_head:
        return want
    if want is None and (per_tensor or per_head):
        return "tensor" if per_tensor else "head"
    expected = {"tensor": "[1]", "head": f"[{kv_heads}, 1, 1]", None: f"[1] or [{kv_heads}, 1, 1]"}[want]
    declared = f" for strategy {STRATEGIES[want]}" if want else ""
    raise CompressedTensorsError(
        f"{model}: {name} has shape {list(shape)}, expected {expected}{declared} (kv heads = {kv_heads}); "
        "fix the tensor or the kv_cache_scheme strategy"
    )


def _check_values(t: torch.Tensor, name: str, model: Path) -> torch.Tensor:
    """The scale as float32 (fp16/bf16 widen exactly); it must be finite and > 0."""
    if not t.dtype.is_floating_point:
        raise CompressedTensorsError(f"{model}: {name} has dtype {t.dtype}; KV scales are floating point")
    f = t.to(torch.float32)
    if not torch.isfinite(f).all() or (f <= 0).any():
        raise CompressedTensorsError(
            f"{model}: {name} = {f.flatten().tolist()[:8]}: KV scales must be finite and > 0 (scale = amax / "
            f"{FP8_MAX[KV_DTYPE]:g}); recalibrate the checkpoint"
        )
    return f
