"""Triton Python-backend stub: token ids -> text with the workspace tokenizer (1/tokenizer).

Kept so the tree matches the upstream TurboMind workspace; this project's runtime detokenizes
in-process and does not use it.
"""

from pathlib import Path

import numpy as np

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> list[bytes]:
        """tokens (B, T), lengths (B,) -> UTF-8 text of each row's first `length` ids."""
        return [
            self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True).encode()
            for row, n in zip(tokens, lengths.reshape(-1), strict=True)
        ]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "sequence_length").as_numpy()
            tokens = tokens.reshape(-1, tokens.shape[-1])
            text = np.array(self.decode(tokens, lengths), dtype=object)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", text)]))
        return responses
