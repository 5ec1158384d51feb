"""Reading a Hugging Face checkpoint directory: config.json, architecture, lazy tensor access.

`load_checkpoint(path)` returns an `HFCheckpoint`: the model dimensions the workspace needs
(validated here, once) and a `TensorSource` that reads one tensor at a time from
`*.safetensors` (single file or sharded through model.safetensors.index.json, via
`safetensors.safe_open`) or `*.bin` (torch.load with mmap=True, weights_only=True).
Nothing here loads the whole model into memory.

Supported architectures: LlamaForCausalLM (Llama 1/2/3, SmolLM2, TinyLlama), MistralForCausalLM,
Qwen2ForCausalLM (q/k/v biases) and InternLMForCausalLM (llama tensor names, q/k/v/o biases).
A config.json without `architectures` (older checkpoints; configs saved with `to_dict()` after
loading a GGUF file) is read by its `model_type`, as transformers' Auto classes do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "InternLMForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "dynamic")
# model_type -> architecture, for configs without `architectures` (transformers' Auto mapping).
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "internlm": "InternLMForCausalLM",
}


class DeployError(ValueError):
    """A checkpoint or deploy argument cannot be used; the message names the file/key/value and the fix."""


@dataclass
class TensorInfo:
    """Where one tensor lives and what it looks like, known without reading its data."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float16", "bfloat16", "float32"


class TensorSource:
    """Lazy per-tensor reads from safetensors or torch .bin files."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.index: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}  # safe_open handles or mmap'd state dicts
        for f in files:
            for name, (shape, dtype) in self._scan(f).items():
                self.index[name] = TensorInfo(f, shape, dtype)

    def _open(self, f: Path):
        if f not in self._handles:
            if f.suffix == ".safetensors":
                from safetensors import SafetensorError, safe_open

                try:
                    self._handles[f] = safe_open(str(f), framework="pt")
                except SafetensorError as e:  # truncated download, garbage header: the file, not our bug
                    raise DeployError(
                        f"{f}: not a readable safetensors file ({e}); the file is truncated or corrupt: "
                        "re-download it (compare its size with the one the model hub lists)"
                    ) from None
            else:
                import torch

                try:
                    self._handles[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                except Exception as e:  # torch raises several types for legacy or pickled-code files
                    raise DeployError(
                        f"{f}: cannot read as a torch state dict with mmap=True, weights_only=True "
                        f"({type(e).__name__}: {e}); re-save it with torch.save or as safetensors"
                    ) from None
        return self._handles[f]

    def _scan(self, f: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        handle = self._open(f)
        if f.suffix == ".safetensors":
            out = {}
            for name in handle.keys():
                sl = handle.get_slice(name)
                out[name] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
            return out
        return {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in handle.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str):
        """One tensor as a CPU torch tensor (its data read now, nothing else)."""
        info = self.index[name]
        handle = self._open(info.file)
        if info.file.suffix == ".safetensors":
            return handle.get_tensor(name)
        return handle[name]


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


@dataclass
class HFCheckpoint:
    """The dimensions and ids of an HF LLaMA-family checkpoint, plus lazy access to its tensors."""

    path: Path
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    inter_size: int
    vocab_size: int
    rope_theta: float
    use_dynamic_ntk: int
    norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    tie_embeddings: bool
    bos_id: int
    eos_id: int
    sliding_window: int | None
    tensors: TensorSource
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by the CLI)


def load_checkpoint(path: str | Path) -> HFCheckpoint:
    """Read config.json (+ generation_config.json) and index the weight files of an HF directory."""
    path = Path(path)
    if not path.exists():
        raise DeployError(f"model path {path} does not exist; pass an HF checkpoint directory")
    if not path.is_dir():
        raise DeployError(f"model path {path} is not a directory; pass the HF checkpoint directory holding config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DeployError(f"no config.json in {path}; pass an HF checkpoint directory (--model-format hf)")
    config = _read_json(config_file)
    generation = _read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    notes: list[str] = []

    arch = _architecture(config, config_file, notes)

    def need(key: str):
        if key not in config:
            raise DeployError(f"{config_file}: missing key {key!r}; is this a complete {arch} config?")
        return config[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if heads * head_dim != hidden:
        raise DeployError(
            f"{config_file}: num_attention_heads {heads} x head_dim {head_dim} = {heads * head_dim} "
            f"!= hidden_size {hidden}; TurboMind layout needs them equal (model not supported)"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise DeployError(f"{config_file}: hidden_act = {config['hidden_act']!r}; only silu (SwiGLU) is supported")
    if config.get("mlp_bias"):
        raise DeployError(f"{config_file}: mlp_bias = true; MLP biases are not supported by the workspace format")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise DeployError(
            f"{config_file}: partial_rotary_factor = {config['partial_rotary_factor']}; "
            "only full rotary embeddings are supported"
        )
    rope_theta, dynamic = _rope(config, config_file)

    if arch == "Qwen2ForCausalLM":
        qkv_bias, o_bias = True, False
    elif arch == "InternLMForCausalLM":
        qkv_bias = o_bias = bool(config.get("bias", True))
    else:
        qkv_bias = o_bias = bool(config.get("attention_bias", False))

    sliding = config.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not config.get("use_sliding_window", False):
        sliding = None

    bos = _token_id(generation, config, "bos_token_id", notes)
    eos = _token_id(generation, config, "eos_token_id", notes)
    if eos is None:
        raise DeployError(f"{config_file}: no eos_token_id (nor in generation_config.json); add it to config.json")
    if bos is None:
        notes.append(f"no bos_token_id in {config_file.name}; start_id = end_id = {eos}")
        bos = eos

    tensors = TensorSource(_weight_files(path))
    tie = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in tensors
    if tie and "lm_head.weight" in tensors:
        notes.append("tie_word_embeddings is set: output.weight is written from model.embed_tokens.weight")

    return HFCheckpoint(
        path=path,
        architecture=arch,
        num_layers=int(need("num_hidden_layers")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        inter_size=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        rope_theta=rope_theta,
        use_dynamic_ntk=dynamic,
        norm_eps=as_written(float(config.get("rms_norm_eps", 1e-6))),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        tie_embeddings=tie,
        bos_id=bos,
        eos_id=eos,
        sliding_window=int(sliding) if sliding else None,
        tensors=tensors,
        notes=notes,
    )


def _architecture(config: dict, config_file: Path, notes: list[str]) -> str:
    """The model class: `architectures[0]`, or by `model_type` when the config names no architecture."""
    archs = config.get("architectures") or []
    if archs:
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise DeployError(
                f"{config_file}: architectures = {archs!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return archs[0]
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        notes.append(
            f"{config_file.name} has no architectures; model_type {model_type!r} -> {MODEL_TYPES[model_type]} "
            "(as transformers' Auto classes read it)"
        )
        return MODEL_TYPES[model_type]
    raise DeployError(
        f"{config_file}: no architectures and model_type = {model_type!r}; neither names a supported model "
        f"(architectures: {', '.join(SUPPORTED_ARCHITECTURES)}; model_type: {', '.join(MODEL_TYPES)}); "
        'add e.g. "architectures": ["LlamaForCausalLM"] if the model really is one of these'
    )


def as_written(value: float) -> float:
    """A float32 value widened to double (GGUF stores 1e-05 as float32: 9.999999747378752e-06 in JSON) back to
    the shortest decimal that float32 rounds to it (1e-05). Computation in fp32 sees the same number either way;
    config.ini then shows the value the model was made with. Other values are kept as they are."""
    import numpy as np

    f32 = np.float32(value)
    if not np.isfinite(f32) or float(f32) != value:  # not a float32 value: it was written as a double
        return value
    return float(str(f32))  # numpy prints a float32 as the shortest decimal that rounds back to it


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DeployError(f"{path}: cannot read JSON ({e}); fix or re-download the file") from None


def _rope(config: dict, config_file: Path) -> tuple[float, int]:
    """rope_theta and use_dynamic_ntk from top-level keys or transformers-5 `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise DeployError(
            f"{config_file}: rope scaling type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}); this runtime implements plain "
            "RoPE and dynamic NTK only"
        )
    return float(theta), int(rope_type == "dynamic")


def _token_id(generation: dict, config: dict, key: str, notes: list[str]) -> int | None:
    """A bos/eos id, generation_config.json first; a list keeps its first id (noted)."""
    value = generation.get(key, config.get(key))
    if isinstance(value, list):
        if not value:
            return None
        notes.append(f"{key} is a list {value}; config.ini keeps the first ({value[0]})")
        value = value[0]
    return None if value is None else int(value)


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors preferred, then torch .bin; index files honoured."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "*.bin"),
    ):
        index = path / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise DeployError(f"{index}: no weight_map; fix or re-download the checkpoint")
            files = [path / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise DeployError(
                    f"{index} lists shards that are missing: {', '.join(missing)}; download the complete checkpoint"
                )
            return files
        files = sorted(path.glob(pattern))
        if pattern == "*.bin":
            files = [f for f in files if f.name not in ("training_args.bin",)]
        if files:
            return files
    raise DeployError(
        f"no weights found in {path} (looked for *.safetensors and *.bin); "
        "download the model weights or pass the right MODEL_PATH"
    )
