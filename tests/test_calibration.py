"""Block-by-block calibration reproduces the model's own forward pass."""

import torch

from compresslab.compress.calibration import BlockwiseCalibration, ChannelMoments, Gram
from compresslab.models.adapters import adapter_for
from compresslab.models.sources import DataSpec, TinyLlama, TinyViT


def _llama():
    torch.manual_seed(0)
    return TinyLlama(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                     intermediate_size=48).build(DataSpec("text", vocab_size=40)).eval()


def test_blockwise_walk_matches_full_forward_llama():
    model = _llama()
    adapter = adapter_for(model)
    batches = [torch.randint(0, 40, (2, 9)), torch.randint(0, 40, (3, 9))]
    _, expected = zip(*[adapter.logits_and_block_outputs(model, b) for b in batches])
    calib = BlockwiseCalibration(model, adapter, batches)
    for index, block in calib:
        got = calib.run_block(block)
        for b, out in enumerate(got):
            torch.testing.assert_close(out, expected[b][index], rtol=1e-5, atol=1e-5)


def test_blockwise_walk_matches_full_forward_vit():
    torch.manual_seed(0)
    vit = TinyViT(embed_dim=32, depth=2).build(DataSpec("image", num_classes=10, image_size=8,
                                                        channels=1)).eval()
    adapter = adapter_for(vit)
    batch = torch.randn(4, 1, 8, 8)
    _, expected = adapter.logits_and_block_outputs(vit, batch)
    calib = BlockwiseCalibration(vit, adapter, [batch])
    for index, block in calib:
        torch.testing.assert_close(calib.run_block(block)[0], expected[index])


def test_statistics_equal_direct_computation():
    model = _llama()
    adapter = adapter_for(model)
    batch = torch.randint(0, 40, (2, 9))
    calib = BlockwiseCalibration(model, adapter, [batch])
    _, block = next(iter(calib))
    down = {"down": adapter.mlp_linears(block)["down"]}
    seen = []
    handle = down["down"].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    gram = calib.collect(block, down, lambda: Gram(torch.float64))["down"]
    moments = calib.collect(block, down, ChannelMoments)["down"]
    handle.remove()
    x = seen[0].reshape(-1, 48).double()
    torch.testing.assert_close(gram.gram, x.T @ x)
    assert gram.count == 18 == moments.count
    torch.testing.assert_close(moments.abs_mean, x.abs().mean(0))
    torch.testing.assert_close(moments.variance, x.var(0, unbiased=False))
    torch.testing.assert_close(moments.l2_norm, x.norm(dim=0))
