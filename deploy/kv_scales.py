"""Deploy's import of KV-cache scales carried by an HF checkpoint (compressed-tensors / vLLM FP8 layout).

The format is read by runtime.compressed_tensors; this module only connects it to deploy: it reads the
scale tensors through the checkpoint's TensorSource, turns format errors into DeployError, and gives the
config.ini that selects the imported FP8 E4M3 scales (kv_cache_dtype fp8_e4m3, kv_granularity tensor|head;
quant_policy keeps 0, as FP8 has no bit there). The parameter files themselves are written by
runtime.kv_params inside deploy's staging directory, so they appear with the workspace or not at all.
Scale tensors are not weights: the name table never asks for them (runtime.compressed_tensors.is_kv_scale).
"""

from __future__ import annotations

from deploy.checkpoint import DeployError, HFCheckpoint
from runtime.compressed_tensors import CompressedTensorsError, ImportedScales, read_kv_scales
from runtime.workspace import WorkspaceConfig, replace


def import_kv_scales(ck: HFCheckpoint, cfg: WorkspaceConfig) -> tuple[WorkspaceConfig, ImportedScales | None]:
    """(config.ini to write, the imported scales); the config is unchanged and None when there are none."""
    try:
        found = read_kv_scales(ck.path, ck.tensors.index, ck.tensors.get, cfg.num_layer, cfg.kv_head_num)
    except CompressedTensorsError as e:
        raise DeployError(str(e)) from None
    if found is None:
        return cfg, None
    return replace(cfg, kv_cache_dtype=found.params.kv_dtype, kv_granularity=found.params.granularity), found
