"""Offline assets: the BF16 GGUF written from the shipped Q4_1 GGUF holds the same
weights (de-quantized, rounded to bf16) and the same metadata."""

import numpy as np
import pytest
import torch

from sparamx.assets import gguf_to_bf16, smollm2_gguf


@pytest.mark.slow
def test_gguf_to_bf16_keeps_weights_and_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")
    src = smollm2_gguf()
    dest = tmp_path / "model.BF16.gguf"
    gguf_to_bf16(src, dest)
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dest)
    assert b.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    for key in ("llama.block_count", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert a.fields[key].contents() == b.fields[key].contents()
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert list(ta.shape) == list(tb.shape), ta.name
        ref = gguf.quants.dequantize(ta.data, ta.tensor_type).astype(np.float32)
        got = gguf.quants.dequantize(tb.data, tb.tensor_type).astype(np.float32)
        expect = torch.from_numpy(ref).to(torch.bfloat16).float().numpy()
        if ta.tensor_type == gguf.GGMLQuantizationType.F32:
            expect = ref  # F32 tensors (norms) are kept as they are
        np.testing.assert_array_equal(got, expect, err_msg=ta.name)
