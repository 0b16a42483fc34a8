"""UpdateCodec: the wire of a deployed round (fp16 down, compressed update up, error feedback) in one process."""

from __future__ import annotations

import pytest
import torch

from lungmae_core.update_codec import UpdateCodec


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 40, generator=g), "b": torch.randn(40, generator=g),
            "n": torch.tensor(3, dtype=torch.int64)}


def test_fp32_is_exact_and_counts_bytes() -> None:
    glob, local = _state(0), _state(1)
    with UpdateCodec("fp32") as codec:
        received = codec.received(glob)
        assert all(torch.equal(received[k], glob[k]) for k in glob)
        new = codec.site_update(0, local, received, glob)
        assert torch.allclose(new["w"], local["w"], atol=1e-6) and int(new["n"]) == 3
        assert codec.sent_fraction() == 1.0 and codec.bytes_sent == [4 * (64 * 40 + 40) + 8]


@pytest.mark.parametrize("compression, fraction", [("fp16", 0.51), ("int8", 0.26), ("topk", 0.16)])
def test_lossy_sum_of_what_arrived_tracks_the_sum_of_updates(compression: str, fraction: float) -> None:
    """Error feedback: over rounds, the decoded updates add up to the true ones minus one residual."""
    glob = _state(0)
    true_sum = torch.zeros(64, 40)
    got_sum = torch.zeros(64, 40)
    with UpdateCodec(compression, tag="t") as codec:
        for r in range(8):
            received = codec.received(glob)
            local = {k: (v + 0.01 * _state(10 + r)[k] if v.is_floating_point() else v) for k, v in received.items()}
            new = codec.site_update(0, local, received, glob)
            true_sum += local["w"] - received["w"]
            got_sum += new["w"] - glob["w"]
        assert codec.sent_fraction() < fraction
    rel = float((got_sum - true_sum).norm() / true_sum.norm())
    assert rel < (0.01 if compression != "topk" else 0.5), rel  # the residual is at most about one round's
    with pytest.raises(ValueError, match="compression must be one of fp32, fp16, int8, topk; got 'zip'"):
        UpdateCodec("zip")


def test_sites_keep_separate_residuals() -> None:
    glob = _state(0)
    with UpdateCodec("topk") as codec:
        received = codec.received(glob)
        codec.site_update(0, _state(1), received, glob)
        codec.site_update(1, _state(2), received, glob)
        assert sorted(p.name for p in codec._dir.iterdir()) == ["site-0", "site-1"]
    assert not codec._dir.exists()


def test_federated_classifier_with_the_fp32_codec_matches_plain_fedavg() -> None:
    """The experiment's FedAvg loop with ``codec``: fp32 changes nothing; int8 differs but stays close."""
    import numpy as np

    from lungmae_core.config import TINY_INPUT_WINDOWS, ModelConfig, TrainConfig
    from lungmae_core.experiment.federation import ArrayDataset, federated_classifier
    from lungmae_core.heads import ILDClassifier

    cfg = ModelConfig(name="t", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=64,
                      mask_ratio=0.5, input_windows=TINY_INPUT_WINDOWS, stem="conv")
    rng = np.random.default_rng(0)
    sites = [ArrayDataset(rng.random((4, 1, 16, 16, 16), dtype=np.float32), np.ones((4, 1, 16, 16, 16), np.uint8),
                          np.array([0, 1, 0, 1])) for _ in range(2)]
    tcfg = TrainConfig(lr=1e-3, max_steps=1, batch_size=2, flip_p=0.0, rot90_p=0.0)
    out = {}
    for name in (None, "fp32", "int8"):
        torch.manual_seed(0)
        clf = ILDClassifier(cfg, 2, pooling="mean")
        codec = UpdateCodec(name) if name else None
        federated_classifier(clf, sites, tcfg, rounds=2, seed=1, device=torch.device("cpu"), num_classes=2,
                             codec=codec)
        out[name] = {k: v.clone() for k, v in clf.state_dict().items()}
        if codec is not None:
            assert len(codec.bytes_sent) == 4  # 2 rounds x 2 sites
            codec.close()
    def gap(name: str) -> float:
        return max(float((out[name][k].float() - v.float()).abs().max()) for k, v in out[None].items())

    # fp32: global + (local - global) is local up to rounding, which round 2's AdamW may amplify up to its lr
    assert gap("fp32") < 1e-4
    assert 0 < gap("int8") < 1e-2
