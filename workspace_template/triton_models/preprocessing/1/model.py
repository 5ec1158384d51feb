"""Triton Python-backend stub: text -> token ids with the workspace tokenizer (1/tokenizer).

Kept so the tree matches the upstream TurboMind workspace; this project's runtime tokenizes
in-process and does not use it. Prompts are expected already wrapped in the chat template.
"""

from pathlib import Path

import numpy as np

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ids (B, T) uint32 with the end id, and lengths (B, 1) uint32."""
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.eos_token_id or 0
        out = np.full((len(ids), width), pad, dtype=np.uint32)
        for i, x in enumerate(ids):
            out[i, : len(x)] = x
        return out, np.array([[len(x)] for x in ids], dtype=np.uint32)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            query = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy()
            ids, lengths = self.encode([q.decode() for q in query.reshape(-1)])
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("INPUT_ID", ids), pb_utils.Tensor("REQUEST_INPUT_LEN", lengths)]
                )
            )
        return responses
