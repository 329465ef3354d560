"""Block-by-block calibration reproduces the model's own forward pass."""

import torch

from compresslab.compress.calibration import BlockwiseCalibration, ChannelMoments, Gram
from compresslab.data.spec import DataSpec
from compresslab.models.architecture import adapter_for
from compresslab.models.llama import TinyLlama
from compresslab.models.vit import TinyViT


def _llama():
    torch.manual_seed(0)
    return TinyLlama(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                     intermediate_size=48).build(DataSpec("text", vocab_size=40)).eval()


def _llama_and_block_outputs():
    """A tiny llama, its adapter, two batches and every block's output on each batch."""
    model = _llama()
    adapter = adapter_for(model)
    batches = [torch.randint(0, 40, (2, 9)), torch.randint(0, 40, (3, 9))]
    _, expected = zip(*[adapter.logits_and_block_outputs(model, b) for b in batches])
    return model, adapter, batches, expected


def test_blockwise_walk_matches_full_forward_llama():
    model, adapter, batches, expected = _llama_and_block_outputs()
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


def test_layers_fed_one_tensor_share_one_statistic_equal_to_separate_ones():
    model = _llama()
    adapter = adapter_for(model)
    batches = [torch.randint(0, 40, (2, 9)), torch.randint(0, 40, (3, 9))]
    calib = BlockwiseCalibration(model, adapter, batches)
    _, block = next(iter(calib))
    layers = adapter.block_linears(block)
    shared = calib.collect(block, layers, lambda: Gram(torch.float64))
    assert shared["q"] is shared["k"] is shared["v"] and shared["gate"] is shared["up"]
    assert shared["q"] is not shared["o"] and shared["down"] is not shared["up"]
    for name, layer in layers.items():   # one layer at a time: nothing to share
        alone = calib.collect(block, {name: layer}, lambda: Gram(torch.float64))[name]
        torch.testing.assert_close(shared[name].gram, alone.gram)
        assert shared[name].count == alone.count == 2 * 9 + 3 * 9


def test_a_layer_the_block_never_calls_gets_an_empty_statistic():
    model = _llama()
    adapter = adapter_for(model)
    calib = BlockwiseCalibration(model, adapter, [torch.randint(0, 40, (2, 9))])
    _, block = next(iter(calib))
    stats = calib.collect(block, {"unused": torch.nn.Linear(32, 32)}, ChannelMoments)
    assert stats["unused"].count == 0


def test_kept_outputs_feed_the_next_block_like_a_fresh_run():
    model, adapter, batches, expected = _llama_and_block_outputs()
    calib = BlockwiseCalibration(model, adapter, batches)
    for index, block in calib:   # collect with kept outputs; advance reuses them
        down = {"down": adapter.mlp_linears(block)["down"]}
        calib.collect(block, down, ChannelMoments, keep_outputs=True)
        assert calib._kept is not None and calib._kept[0] is block
        if index:
            for b, (args, _) in enumerate(calib.inputs):
                torch.testing.assert_close(args[0], expected[b][index - 1])


def test_statistics_of_converted_inputs_are_accumulated_in_bounded_chunks(monkeypatch):
    import compresslab.compress.calibration as calibration

    x = torch.randn(5, 7, 6)
    whole_gram, whole_moments = Gram(torch.float64), ChannelMoments()
    whole_gram.update(x)
    whole_moments.update(x)
    monkeypatch.setattr(calibration, "CHUNK_ELEMENTS", 12)   # two rows of 6 at a time
    assert [c.shape[0] for c in calibration.row_chunks(x, torch.float64)] == [2] * 17 + [1]
    gram, moments = Gram(torch.float64), ChannelMoments()
    gram.update(x)
    moments.update(x)
    torch.testing.assert_close(gram.gram, whole_gram.gram, rtol=1e-12, atol=1e-12)
    for name in ("sum", "abs_sum", "sq_sum"):
        torch.testing.assert_close(getattr(moments, name), getattr(whole_moments, name),
                                   rtol=1e-12, atol=1e-12)
    assert gram.count == moments.count == 35


def test_collect_stops_the_block_once_every_layer_has_its_input():
    """Statistics of the attention output only: the MLP is not run (but the statistic is
    the one a full pass gives); with keep_outputs the whole block runs."""
    model = _llama()
    adapter = adapter_for(model)
    calib = BlockwiseCalibration(model, adapter, [torch.randint(0, 40, (2, 9))] * 2)
    _, block = next(iter(calib))
    o_proj = {"o": adapter.attention_linears(block)["o"]}
    mlp_calls = []
    handle = adapter.mlp_linears(block)["down"].register_forward_hook(
        lambda m, i, o: mlp_calls.append(1))
    early = calib.collect(block, o_proj, lambda: Gram(torch.float64))["o"]
    assert mlp_calls == []
    full = calib.collect(block, o_proj, lambda: Gram(torch.float64), keep_outputs=True)["o"]
    handle.remove()
    assert len(mlp_calls) == 2
    torch.testing.assert_close(early.gram, full.gram, rtol=0, atol=0)
    assert early.count == full.count == 36
