"""DP-SGD on our real models: secret randomness, patients as the unit, per-sample gradients, clipping, noise
scale, sample rate, step cap, learning. No test depends on the exact value of a noisy draw."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import lungmae_core.model as model_module
from lungmae_core.config import TrainConfig, model_config
from lungmae_core.errors import ConfigError, PrivacyBudgetExceeded
from lungmae_core.heads import ILDClassifier
from lungmae_core.loss import lung_fraction_per_patch, lung_weighted_l1
from lungmae_core.model import build_mae
from lungmae_core.privacy import (
    PRETRAIN_CLIP,
    DPConfig,
    DPIncompatibleModelError,
    OpacusPrivacy,
    PatientSampled,
    check_delta,
    default_delta,
    dp_problems,
    epsilon_for,
    is_empty_batch,
    is_privacy_refusal,
    noise_for_target_epsilon,
    plan_round,
    register_grad_samplers,
    sample_rate_for,
    secure_generator,
    steps_for,
)
from lungmae_core.train import evaluate_classifier, evaluate_mae, train_classifier, train_mae

S = 32  # the tiny architecture at 32^3 (8 tokens of 16^3): same layers, 8x fewer voxels than 64^3


class Phantoms(Dataset):
    """Spheres of "lung" in the left (label 0) or right (label 1) half of a 32^3 volume, in [0, 1]."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        zz = torch.linspace(-1, 1, S)
        d, h, w = torch.meshgrid(zz, zz, zz, indexing="ij")
        self.items = []
        for i in range(n):
            label = i % 2
            c = torch.rand(3, generator=g) * 0.4 - 0.2
            r = 0.5 + 0.1 * torch.rand(1, generator=g)
            body = (((d - c[0]) ** 2 + (h - c[1]) ** 2 + (w - c[2]) ** 2) < r ** 2).float()
            side = (w > 0).float() if label else (w <= 0).float()
            img = (0.1 + 0.6 * body * side + 0.02 * torch.randn(S, S, S, generator=g)).clamp(0, 1)
            self.items.append({"image": img[None], "lung_mask": body[None], "label": label})
        self.patient_ids = [f"pat-{seed}-{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _batch(ds: Phantoms, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(n)]
    return (torch.stack([x["image"] for x in items]), torch.stack([x["lung_mask"] for x in items]),
            torch.tensor([x["label"] for x in items]))


def _per_sample_masking(x: torch.Tensor, mask_ratio: float, generator=None):
    """random_masking whose mask depends only on each sample's own tokens (so batch == one-by-one)."""
    b, n, e = x.shape
    keep = int(n * (1 - mask_ratio))
    noise = x.detach().sum(-1).sin()  # (B, L), a per-sample deterministic order
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, e))
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, message", [
    ({"enabled": True, "noise_multiplier": 1.0}, "epsilon (the site's total privacy budget) is required"),
    ({"enabled": True, "epsilon": 3.0}, "noise-multiplier or target-epsilon-per-round is required"),
    ({"enabled": True, "epsilon": 3.0, "noise_multiplier": 1.0, "target_epsilon_per_round": 1.0},
     "give either noise-multiplier or target-epsilon-per-round, not both"),
    ({"epsilon": -1.0}, "epsilon (the site's total budget) must be a number > 0; got -1.0"),
    ({"delta": 1.0}, "delta must be in the open range (0, 1); got 1.0"),
    ({"max_grad_norm": 0.0}, "max-grad-norm must be a number > 0; got 0.0"),
    ({"pretrain_max_grad_norm": float("nan")}, "pretrain-max-grad-norm must be a number > 0"),
    ({"finetune_trainable": "head"}, "finetune-trainable must be 'full', 'linear-probe' or 'last-K'"),
    ({"noise_multiplier": 0.0}, "noise-multiplier must be a number > 0; got 0.0"),
    ({"enabled": True, "epsilon": 1.0, "target_epsilon_per_round": 2.0},
     "target-epsilon-per-round 2.0 must not exceed the total epsilon 1.0"),
])
def test_dp_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError) as err:
        DPConfig(**kwargs)
    assert message in str(err.value)


def test_dp_config_clip_bound_per_phase():
    cfg = DPConfig(enabled=True, epsilon=3.0, noise_multiplier=1.0, max_grad_norm=2.0, pretrain_max_grad_norm=0.01)
    assert cfg.clip_for("pretrain") == 0.01 and cfg.clip_for("finetune") == 2.0


# --------------------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("n, batch", [(10, 4), (8, 2), (93, 1), (7, 7), (5, 8)])
def test_sample_rate_and_steps_are_those_of_opacus_poisson_loader(n, batch):
    from opacus.data_loader import DPDataLoader

    loader = DPDataLoader.from_data_loader(DataLoader([(torch.tensor(i),) for i in range(n)], batch_size=batch))
    assert sample_rate_for(n, batch) == loader.sample_rate
    assert steps_for(n, batch, epochs=3) == 3 * len(loader)
    assert steps_for(n, batch, epochs=3, max_steps=2) == 2
    assert steps_for(n, batch, epochs=1, max_steps=50) == 50  # train.py runs max_steps when it is set


def test_epsilon_for_is_opacus_rdp_accountant_stepped_independently():
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for sigma, q, steps in [(1.1, 0.25, 8), (0.9, 0.5, 3), (1.1, 0.25, 8)]:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    history = [(1.1, 0.25, 8), (0.9, 0.5, 3), (1.1, 0.25, 8)]
    assert epsilon_for(history, 1e-5) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)
    assert epsilon_for([], 1e-5) == 0.0


def test_noise_for_target_epsilon_meets_the_target():
    sigma = noise_for_target_epsilon(1.0, 1e-3, sample_rate=0.25, steps=12)
    eps = epsilon_for([(sigma, 0.25, 12)], 1e-3)
    assert 0.95 <= eps <= 1.0
    plan = plan_round(DPConfig(enabled=True, epsilon=5.0, target_epsilon_per_round=1.0), num_samples=8,
                      batch_size=2, epochs=3, delta=1e-3)
    assert plan.epsilon_round <= 1.0 and plan.steps == 12 and plan.sample_rate == 0.25


def test_plan_round_errors():
    cfg = DPConfig(enabled=True, epsilon=5.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="the training set is empty"):
        plan_round(cfg, num_samples=0, batch_size=2, epochs=1, delta=1e-3)
    with pytest.raises(ConfigError, match="epochs 0 and batch size 2"):
        plan_round(cfg, num_samples=4, batch_size=2, epochs=0, delta=1e-3)


def test_refusal_reason_is_recognised():
    assert is_privacy_refusal("privacy-refusal: budget exhausted")
    assert not is_privacy_refusal("Traceback ... privacy-refusal") and not is_privacy_refusal(None)


# ----------------------------------------------------------------------------------------- compatibility
def test_our_models_are_dp_compatible_and_bad_ones_are_explained():
    cfg = model_config("tiny", img_size=S)
    assert dp_problems(build_mae(cfg, seed=0)) == []
    assert dp_problems(ILDClassifier(cfg, num_classes=4, pooling="cls")) == []

    class BareCls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.head = nn.Linear(4, 2)

    problems = dp_problems(nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), BareCls()))
    assert any("BatchNorm" in p for p in problems)
    assert any("module '2' (BareCls) holds trainable parameter(s) ['cls_token'] beside its submodules" in p
               and "LearnedToken" in p for p in problems)
    plan = plan_round(DPConfig(enabled=True, epsilon=5.0, noise_multiplier=1.0), num_samples=4, batch_size=2,
                      epochs=1, delta=1e-3)
    model = BareCls()
    with pytest.raises(DPIncompatibleModelError, match=r"Unable to train BareCls with DP-SGD.*\n  1\. module"):
        OpacusPrivacy(plan).make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                         DataLoader(list(range(4)), batch_size=2))


def test_loader_that_does_not_match_the_plan_is_refused():
    plan = plan_round(DPConfig(enabled=True, epsilon=5.0, noise_multiplier=1.0), num_samples=6, batch_size=2,
                      epochs=1, delta=1e-3)
    model = nn.Linear(3, 1)
    data = TensorDataset(torch.randn(6, 3))
    data.patient_ids = ["a", "a", "b", "c", "d", "e"]  # 6 scans of 5 patients
    with pytest.raises(ConfigError, match=r"loader has 5 patients \(6 scans\), batch size 2 and drop_last False; the "
                                          "plan was made for 6 patients at batch size 2"):
        OpacusPrivacy(plan).make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                         DataLoader(data, batch_size=2))
    with pytest.raises(ConfigError, match="Unable to sample by patient as the dataset list has no patient_ids"):
        OpacusPrivacy(plan).make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                         DataLoader(list(range(6)), batch_size=2))


# ------------------------------------------------------------------------------------ per-sample gradients
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_mae_per_sample_gradients_match_an_explicit_loop(monkeypatch, mode):
    """Opacus' per-sample gradients on our MAE equal backprop of each sample alone (all params, incl. tokens)."""
    from opacus import GradSampleModule

    monkeypatch.setattr(model_module, "random_masking", _per_sample_masking)
    register_grad_samplers()
    cfg = model_config("tiny", img_size=S)
    mae = build_mae(cfg, seed=0)
    x, lung, _ = _batch(Phantoms(3, seed=0), 3)

    def loss(model: nn.Module, imgs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        pred, mask = model(imgs)
        lung = lung_fraction_per_patch(masks, 16)
        return lung_weighted_l1(pred, mae.patchify(imgs), mask, lung, per_sample=True).total

    gsm = GradSampleModule(mae, force_functorch=mode == "functorch")
    loss(gsm, x, lung).mean().backward()
    per_sample = {n: p.grad_sample.detach().clone() for n, p in mae.named_parameters()}
    gsm._close()
    assert set(per_sample) == {n for n, _ in mae.named_parameters()}  # mask token and pos embeds included
    for i in range(3):
        mae.zero_grad(set_to_none=True)
        loss(mae, x[i:i + 1], lung[i:i + 1]).sum().backward()
        for name, p in mae.named_parameters():
            scale = p.grad.abs().max().clamp_min(1e-12)
            assert (per_sample[name][i] - p.grad).abs().max() / scale < 1e-5, name


def test_classifier_cls_token_per_sample_gradients_match_an_explicit_loop():
    from opacus import GradSampleModule

    register_grad_samplers()
    clf = ILDClassifier(model_config("tiny", img_size=S), num_classes=2, pooling="cls")
    x, _, y = _batch(Phantoms(3, seed=1), 3)
    gsm = GradSampleModule(clf)
    F.cross_entropy(gsm(x), y).backward()
    per_sample = {n: p.grad_sample.detach().clone() for n, p in clf.named_parameters()}
    gsm._close()
    assert "cls_token.weight" in per_sample
    for i in range(3):
        clf.zero_grad(set_to_none=True)
        F.cross_entropy(clf(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in clf.named_parameters():
            assert torch.allclose(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max()), name


# ------------------------------------------------------------------------------------ clipping and noise
def test_each_sample_is_clipped_to_c_and_noise_has_the_stated_scale():
    """On the tiny classifier: per-sample norms far above C are clipped to C before noise N(0, (sigma C)^2)."""
    clip, sigma = 1e-2, 0.8
    ds = Phantoms(6, seed=2)
    clf = ILDClassifier(model_config("tiny", img_size=S), num_classes=2)
    plan = plan_round(DPConfig(enabled=True, epsilon=50.0, noise_multiplier=sigma, max_grad_norm=clip),
                      num_samples=6, batch_size=3, epochs=1, delta=1e-3)
    privacy = OpacusPrivacy(plan)
    model, optimizer, loader = privacy.make_private(
        clf, torch.optim.SGD(clf.parameters(), lr=0.0), DataLoader(ds, batch_size=3))
    batch = next(b for b in loader if not is_empty_batch(b))
    F.cross_entropy(model(batch["image"], batch["lung_mask"]), batch["label"]).backward()
    params = [p for p in clf.parameters() if p.requires_grad]
    raw = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], dim=1).norm(dim=1)  # (B,)
    assert (raw > 10 * clip).all(), raw  # every sample really needs clipping
    factor = (clip / (raw + 1e-6)).clamp(max=1.0)
    clipped_norms = torch.stack([(p.grad_sample * factor.view(-1, *[1] * (p.dim()))).flatten(1).norm(dim=1)
                                 for p in params], dim=1).norm(dim=1)
    assert (clipped_norms <= clip * (1 + 1e-4)).all()  # float32 rounding of clip / raw
    expected_sum = [torch.einsum("i,i...", factor, p.grad_sample) for p in params]
    optimizer.step()
    for p, expected in zip(params, expected_sum, strict=True):  # Opacus' clipped sum (before noise) is ours
        assert torch.allclose(p.summed_grad, expected, rtol=1e-4, atol=1e-9)
    noise = torch.cat([(p.grad * optimizer.expected_batch_size - p.summed_grad).flatten() for p in params])
    assert noise.numel() > 100_000
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.02)
    assert abs(noise.mean().item()) < 0.01 * sigma * clip
    assert privacy.steps_taken == 1 and privacy.history == [(sigma, 0.5, 1)]


def test_the_step_after_the_plan_is_refused_before_it_changes_the_model():
    ds = Phantoms(4, seed=3)
    clf = ILDClassifier(model_config("tiny", img_size=S), num_classes=2)
    plan = plan_round(DPConfig(enabled=True, epsilon=50.0, noise_multiplier=1.0), num_samples=4, batch_size=2,
                      epochs=1, delta=1e-3)
    privacy = OpacusPrivacy(plan)
    model, optimizer, _ = privacy.make_private(clf, torch.optim.SGD(clf.parameters(), lr=0.1),
                                               DataLoader(ds, batch_size=2))
    for _ in range(plan.steps):  # empty steps (no backward) are noise-only DP-SGD steps
        optimizer.zero_grad()
        optimizer.step()
    before = clf.head.weight.detach().clone()
    optimizer.zero_grad()
    with pytest.raises(PrivacyBudgetExceeded, match=f"Unable to take DP-SGD step {plan.steps + 1} as the round's "
                                                    f"plan, recorded in the privacy ledger before training, "
                                                    f"allows {plan.steps} steps"):
        optimizer.step()
    assert torch.equal(clf.head.weight, before)
    assert privacy.steps_taken == plan.steps


# ---------------------------------------------------------------------------------------------- learning
def test_dp_training_lowers_the_mae_loss():
    train, test = Phantoms(16, seed=0), Phantoms(8, seed=1)
    mae = build_mae(model_config("tiny", img_size=S), seed=0)
    before = evaluate_mae(mae, test, seed=0)["l1_masked"]
    cfg = TrainConfig(lr=3e-3, weight_decay=0.0, warmup_frac=0.0, epochs=4, batch_size=16, amp="none",
                      flip_p=0.0, rot90_p=0.0)
    # These toy spheres give per-sample norms near 0.003 (the phantoms' are measured for PRETRAIN_CLIP): clip there
    dp = DPConfig(enabled=True, epsilon=50.0, noise_multiplier=1.0, pretrain_max_grad_norm=0.005)
    plan = plan_round(dp, num_samples=16, batch_size=16, epochs=4, delta=1e-3, phase="pretrain")
    privacy = OpacusPrivacy(plan)
    result = train_mae(mae, train, cfg, device="cpu", seed=0, privacy=privacy)
    after = evaluate_mae(mae, test, seed=0)["l1_masked"]
    assert plan.max_grad_norm == 0.005 and DPConfig().pretrain_max_grad_norm == PRETRAIN_CLIP
    assert privacy.steps_taken == result["num_steps"] == plan.steps
    assert after < before - 0.002, (before, after)


def test_dp_linear_probe_classifier_beats_chance():
    train, test = Phantoms(24, seed=0), Phantoms(16, seed=1)
    torch.manual_seed(0)
    clf = ILDClassifier(model_config("tiny", img_size=S), num_classes=2)
    # The noise is secret and fresh on every run, so the margin must hold for any draw: 16 steps at sigma 0.5
    # gave ROC AUC 1.0 and balanced accuracy >= 0.94 in 4 of 4 runs (8 steps at sigma 1: AUC 0.875 once).
    cfg = TrainConfig(lr=2e-2, weight_decay=0.0, warmup_frac=0.0, epochs=16, batch_size=24, amp="none",
                      flip_p=0.0, rot90_p=0.0, finetune_mode="linear-probe")
    plan = plan_round(DPConfig(enabled=True, epsilon=50.0, noise_multiplier=0.5), num_samples=24, batch_size=24,
                      epochs=16, delta=1e-3)
    privacy = OpacusPrivacy(plan)
    train_classifier(clf, train, cfg, class_weights=None, device="cpu", seed=0, privacy=privacy)
    metrics = evaluate_classifier(clf, test, num_classes=2)
    assert privacy.steps_taken == plan.steps
    assert metrics["roc_auc"] >= 0.9 and metrics["balanced_accuracy"] > 0.5, metrics  # chance: 0.5 and 0.5
    assert math.isfinite(privacy.epsilon(1e-3))


# -------------------------------------------------------------------------------------------- central DP
def test_central_dp_mean_clips_each_update_and_adds_noise_of_the_stated_scale():
    from lungmae_core.privacy import central_dp_epsilon, central_dp_mean

    big = {"w": torch.full((200, 500), 1.0), "b": torch.zeros(7)}  # norm 316: clipped to 2
    small = {"w": torch.zeros(200, 500), "b": torch.full((7,), 0.1)}  # norm 0.26: kept
    quiet, norms = central_dp_mean([big, small], clip=2.0, noise_multiplier=1e-9)
    assert norms == pytest.approx([316.2278, 0.2646], rel=1e-4)
    assert quiet["w"] == pytest.approx(torch.full((200, 500), 2.0 / 316.2278 / 2), rel=1e-4)
    assert quiet["b"] == pytest.approx(torch.full((7,), 0.05), rel=1e-4)
    noisy, _ = central_dp_mean([big, small], clip=2.0, noise_multiplier=0.5)  # a fresh secret generator
    again, _ = central_dp_mean([big, small], clip=2.0, noise_multiplier=0.5)
    noise = (noisy["w"] - quiet["w"]).flatten()
    assert noise.std().item() == pytest.approx(0.5 * 2.0 / 2, rel=0.02)  # sigma * S / n
    assert not torch.equal(noisy["w"], again["w"])  # same inputs, different noise
    for seed in (0, 7919, 7919 + 1, 3 * 7919 + 2):  # what the server used to seed it with: none reproduces it
        replay, _ = central_dp_mean([big, small], clip=2.0, noise_multiplier=0.5,
                                    generator=torch.Generator().manual_seed(seed))
        assert not torch.equal(noisy["w"], replay["w"])
    assert central_dp_epsilon(1.0, 3, 1e-3) == pytest.approx(epsilon_for([(1.0, 1.0, 3)], 1e-3))
    with pytest.raises(ValueError, match="central DP needs clip > 0 and noise_multiplier > 0; got 0.0 and 1.0"):
        central_dp_mean([small], clip=0.0, noise_multiplier=1.0)


# ------------------------------------------------------------------------------------- secret randomness
def test_secure_generator_state_is_secret_and_full_width():
    """Two generators differ, draws have the right statistics, and the CPU state is not a 32-bit seeding."""
    a, b = secure_generator(), secure_generator()
    x, y = torch.randn(200_000, generator=a), torch.randn(200_000, generator=b)
    assert not torch.equal(x[:100], y[:100])
    assert abs(x.mean().item()) < 0.02 and x.std().item() == pytest.approx(1.0, rel=0.02)
    state = secure_generator().get_state()
    first = int.from_bytes(bytes(state[24:28].tolist()), "little")
    seeded = torch.Generator().manual_seed(first).get_state()  # what manual_seed of that word would give
    assert not torch.equal(state[32:5016], seeded[32:5016])
    # torch's CPU generator keeps only 32 bits of a manual seed: the reason the state is written instead
    hi = torch.Generator().manual_seed(5 + (1 << 40))
    assert torch.equal(torch.rand(4, generator=hi), torch.rand(4, generator=torch.Generator().manual_seed(5)))


def _dp_step(seed: int) -> tuple[torch.Tensor, OpacusPrivacy]:
    """One DP-SGD step of a fresh linear probe; everything a caller controls is seeded with ``seed``."""
    torch.manual_seed(seed)
    ds = Phantoms(8, seed=seed)
    clf = ILDClassifier(model_config("tiny", img_size=S), num_classes=2)
    plan = plan_round(DPConfig(enabled=True, epsilon=50.0, noise_multiplier=1.0), num_samples=8, batch_size=8,
                      epochs=1, delta=1e-5)
    privacy = OpacusPrivacy(plan, trainable="linear-probe")
    model, optimizer, loader = privacy.make_private(clf, torch.optim.SGD(clf.parameters(), lr=1.0),
                                                    DataLoader(ds, batch_size=8))
    rng = torch.get_rng_state()
    batch = next(iter(loader))
    optimizer.zero_grad()
    if not is_empty_batch(batch):
        F.cross_entropy(model(batch["image"], batch["lung_mask"]), batch["label"]).backward()
    optimizer.step()
    assert torch.equal(torch.get_rng_state(), rng)  # neither the sampler nor the noise touched the global RNG
    return clf.head.weight.detach().clone(), privacy


def test_the_same_round_twice_gives_different_updates_and_opacus_uses_our_generators():
    first, privacy = _dp_step(0)
    second, _ = _dp_step(0)
    assert not torch.equal(first, second)
    assert privacy.loader.batch_sampler.generator is privacy.sample_generator
    assert privacy.optimizer.generator is privacy.noise_generator
    assert privacy.sample_generator is not privacy.noise_generator
    trained = {n for n, p in privacy.module._module.named_parameters() if p.requires_grad}
    assert trained == {"norm.weight", "norm.bias", "head.weight", "head.bias"}  # narrowed from "full"


def test_poisson_sampling_rate_matches_the_plan_and_differs_between_runs():
    data = TensorDataset(torch.arange(40.0)[:, None])
    data.patient_ids = [f"p{i}" for i in range(40)]
    plan = plan_round(DPConfig(enabled=True, epsilon=50.0, noise_multiplier=1.0), num_samples=40, batch_size=10,
                      epochs=50, delta=1e-5)
    sizes, draws = [], []
    for _ in range(2):
        model = nn.Linear(1, 1)
        privacy = OpacusPrivacy(plan)
        _, _, loader = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                            DataLoader(data, batch_size=10))
        run = [sorted(int(v) for v in batch[0].flatten().tolist()) for _ in range(50) for batch in loader]
        sizes += [len(b) for b in run]
        draws.append(run)
    q, n = plan.sample_rate, len(sizes)
    assert q == 0.25 and n == 400
    mean = sum(sizes) / n  # binomial(40, q): mean 10, sd sqrt(40 q (1 - q)) / sqrt(n)
    assert abs(mean - 40 * q) < 4 * math.sqrt(40 * q * (1 - q) / n), mean
    assert draws[0] != draws[1]


def test_patient_sampled_draws_one_scan_per_patient_and_uses_them_all():
    data = TensorDataset(torch.arange(7.0))
    data.patient_ids = ["a", "a", "a", "b", "c", "c", "d"]
    units = PatientSampled(Subset(data, [0, 1, 2, 4, 5, 6]))  # through a Subset too: a, a, a, c, c, d
    assert len(units) == 3 and units.patient_ids == ["a", "c", "d"]
    seen = {int(units[0][0]) for _ in range(200)}
    assert seen == {0, 1, 2}  # every scan of patient a, one at a time
    assert {int(units[2][0]) for _ in range(20)} == {6}


def test_default_delta_and_its_bound():
    assert default_delta(100) == 1e-5 and default_delta(10**6) == pytest.approx(1e-7)
    check_delta(1e-5, 50_000)
    with pytest.raises(ConfigError, match=r"Unable to use delta 0.001 \(site.yaml privacy.delta\) as it is above "
                                          r"1/N = 0.000833 for this site's 1200 patients"):
        check_delta(1e-3, 1200)
