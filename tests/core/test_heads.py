"""ILD classifier: pooling, strict encoder transfer from the MAE, linear-probe gradients."""

from __future__ import annotations

import pytest
import torch

from lungmae_core.config import model_config
from lungmae_core.errors import ConfigError, WeightsMismatchError
from lungmae_core.heads import (
    ILDClassifier,
    narrow_trainable,
    parse_finetune_mode,
    set_trainable,
    trainable_state_dict,
    transfer_encoder,
)
from lungmae_core.model import build_mae

CFG = model_config("tiny", img_size=32)


@pytest.mark.parametrize("pooling, classes, has_cls", [("mean", 4, False), ("cls", 2, True)])
def test_classifier_shapes(pooling: str, classes: int, has_cls: bool) -> None:
    clf = ILDClassifier(CFG, classes, pooling=pooling)
    assert tuple(clf(torch.rand(3, 1, 32, 32, 32)).shape) == (3, classes)
    assert (clf.cls_token is not None) == has_cls


def test_lung_pooling_weights_tokens_by_their_lung_fraction() -> None:
    torch.manual_seed(0)
    clf = ILDClassifier(CFG, 4, pooling="lung").eval()
    images = torch.rand(2, 1, 32, 32, 32)
    tokens = clf.encoder(images)  # (B, 8, E): a 2x2x2 grid of 16^3 patches
    mask = torch.zeros(2, 1, 32, 32, 32)
    mask[0, :, :16, :16, :16] = 1.0                 # scan 0: all lung in token 0
    mask[1, :, :16, :16, :16] = 1.0                 # scan 1: token 0 all lung, token 7 half lung
    mask[1, :, 16:, 16:, 16:24] = 1.0
    w0 = torch.tensor([1.0] + [0.0] * 7) + 1e-3     # lung fraction + the non-lung token weight
    w1 = torch.tensor([1.0] + [0.0] * 6 + [0.5]) + 1e-3
    expected = torch.stack([(tokens[0] * (w0 / w0.sum())[:, None]).sum(0),
                            (tokens[1] * (w1 / w1.sum())[:, None]).sum(0)])
    with torch.no_grad():
        torch.testing.assert_close(clf.features(images, mask), clf.norm(expected), rtol=1e-4, atol=1e-5)
        # An empty mask falls back to the plain mean instead of dividing by zero.
        torch.testing.assert_close(clf.features(images, torch.zeros_like(mask)), clf.norm(tokens.mean(1)),
                                   rtol=1e-4, atol=1e-5)


def test_lung_pooling_without_a_mask_says_what_to_do() -> None:
    clf = ILDClassifier(CFG, 4)
    assert clf.pooling == "lung" and clf.needs_lung_mask
    with pytest.raises(ValueError, match="no lung mask was given; call model\\(images, lung_mask\\)"):
        clf(torch.rand(1, 1, 32, 32, 32))


def test_lung_and_mean_pooling_share_their_parameters() -> None:
    assert ILDClassifier(CFG, 4, pooling="lung").state_dict().keys() == \
        ILDClassifier(CFG, 4, pooling="mean").state_dict().keys()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 4, "pooling": "max"}, "pooling must be one of 'lung', 'mean', 'cls'; got 'max'"),
    ({"num_classes": 1}, "num_classes must be an integer >= 2; got 1"),
])
def test_classifier_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ILDClassifier(CFG, **kwargs)
    assert message in str(info.value)


def test_transfer_copies_encoder_and_drops_decoder() -> None:
    mae, clf = build_mae(CFG, seed=1), ILDClassifier(CFG, 4)
    loaded = transfer_encoder(mae.state_dict(), clf)
    assert "encoder.pos_embed.weight" in loaded and not any(k.startswith("decoder") for k in loaded)
    for name, value in mae.encoder.state_dict().items():
        assert torch.equal(clf.encoder.state_dict()[name], value)
    transfer_encoder(mae, clf)  # a module works as well


def _mae_state() -> dict[str, torch.Tensor]:
    return dict(build_mae(CFG, seed=1).state_dict())


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("encoder.norm.bias"), "missing encoder.norm.bias"),
    (lambda s: s.__setitem__("encoder.extra.weight", torch.zeros(1)), "unexpected encoder.extra.weight"),
    (lambda s: s.__setitem__("encoder.pos_embed.weight", torch.zeros(1, 64, 192)),
     "shape mismatch (source vs classifier) encoder.pos_embed.weight (1, 64, 192) vs (1, 8, 192)"),
    (lambda s: s.__setitem__("head.weight", torch.zeros(1)), "neither the encoder nor the decoder: head.weight"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("encoder.")], "the source has no 'encoder.*' entries"),
])
def test_transfer_is_strict_and_names_the_key(edit, message: str) -> None:
    state = _mae_state()
    edit(state)
    clf = ILDClassifier(CFG, 4)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as info:
        transfer_encoder(state, clf)
    assert message in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())  # nothing half-loaded


def test_linear_probe_gradients_reach_only_head_norm_and_cls() -> None:
    clf = ILDClassifier(CFG, 4, pooling="cls")
    names = set_trainable(clf, "linear-probe")
    assert set(names) == {"cls_token.weight", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    torch.nn.functional.cross_entropy(clf(torch.rand(2, 1, 32, 32, 32)), torch.tensor([0, 3])).backward()
    for name, p in clf.named_parameters():
        if name in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert set(trainable_state_dict(clf)) == set(names)
    assert len(set_trainable(clf, "full")) == len(list(clf.parameters()))


def test_set_trainable_bad_mode() -> None:
    with pytest.raises(ConfigError, match=r"finetune mode must be 'full', 'linear-probe' or 'last-K' \(K in 1..99, "
                                          r"e.g. 'last-2'\); got 'probe'"):
        set_trainable(ILDClassifier(CFG, 2), "probe")
    for bad in ("last-0", "last-", "last-100", "Last-1"):
        with pytest.raises(ConfigError, match="finetune mode must be"):
            set_trainable(ILDClassifier(CFG, 2), bad)
    with pytest.raises(ConfigError, match=f"finetune mode 'last-9' trains 9 blocks but the encoder has only "
                                          f"{CFG.depth}"):
        set_trainable(ILDClassifier(CFG, 2), "last-9")


def test_last_k_trains_the_probe_plus_the_last_k_blocks_and_the_final_norm() -> None:
    clf = ILDClassifier(CFG, 4)
    depth = len(clf.encoder.blocks)
    names = set(set_trainable(clf, "last-1"))
    probe = set(set_trainable(ILDClassifier(CFG, 4), "linear-probe"))
    last = {n for n, _ in clf.named_parameters() if n.startswith(f"encoder.blocks.{depth - 1}.")}
    final_norm = {"encoder.norm.weight", "encoder.norm.bias"}
    assert last and names == probe | last | final_norm
    torch.nn.functional.cross_entropy(clf(torch.rand(2, 1, 32, 32, 32), torch.ones(2, 1, 32, 32, 32)),
                                      torch.tensor([0, 3])).backward()
    for name, p in clf.named_parameters():
        assert (p.grad is not None) == (name in names), name
    every_block = set(set_trainable(clf, f"last-{depth}"))
    assert {n for n, _ in clf.named_parameters() if n.startswith("encoder.blocks.")} <= every_block
    assert not any(n.startswith("encoder.blocks.") for n in probe)


def test_narrow_trainable_only_freezes_never_unfreezes() -> None:
    clf = ILDClassifier(CFG, 4)
    set_trainable(clf, "linear-probe")
    probe = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert set(narrow_trainable(clf, "last-2")) == probe  # a site cannot widen what the server asked
    set_trainable(clf, "full")
    kept = set(narrow_trainable(clf, "last-1"))
    assert kept == set(set_trainable(ILDClassifier(CFG, 4), "last-1"))
    assert {n for n, p in clf.named_parameters() if p.requires_grad} == kept
    assert parse_finetune_mode("last-3") == 3 and parse_finetune_mode("linear-probe") == 0
    assert parse_finetune_mode("full") is None
