"""The method table (`mmalign.methods`): one mapping from method.name / loss_type to the loss core, the same on
every surrogate kind, with one metric scheme; what a method cannot do is refused by name."""

import math

import pytest
import torch

from mmalign.losses import diffusion_dpo_loss, dpo_loss, mapo_loss, ranked_dpo_loss
from mmalign.methods import METHODS, check_method, preference_loss
from mmalign.models.contract import Surrogates


def _errors(k=2, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    err = 0.1 + torch.rand(k, b, generator=g, dtype=torch.float64)
    ref = err + 0.01 * torch.randn(k, b, generator=g, dtype=torch.float64)
    return Surrogates(-err, -ref, "error", t=torch.arange(b), num_train_timesteps=1000)


def _logps(seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 9, (2, 5), generator=g)
    pol = -counts * (1 + torch.rand(2, 5, generator=g, dtype=torch.float64))
    ref = pol + 0.1 * torch.randn(2, 5, generator=g, dtype=torch.float64)
    return Surrogates(pol, ref, "logp", counts=counts)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_on_errors_is_diffusion_dpo_with_and_without_label_smoothing(smoothing):
    s = _errors()
    loss, m = preference_loss("dpo", s, beta=4000.0, loss_type="robust", label_smoothing=smoothing)
    err, ref = -s.policy, -s.reference
    want, want_m = diffusion_dpo_loss(err[0], err[1], ref[0], ref[1], 4000.0, "robust", smoothing)
    assert loss.item() == want.item()
    assert m.keys() == want_m.keys()  # label smoothing changes the loss, not which loss or which metrics
    assert {"mse/policy_chosen", "mse/ref_rejected", "rewards/accuracies"} <= m.keys()
    # and it is DPO on the surrogates -err with beta/2
    same, _ = dpo_loss(s.policy[0], s.policy[1], s.reference[0], s.reference[1], 2000.0, "robust", smoothing)
    assert loss.item() == pytest.approx(same.item(), rel=1e-12)


def test_dpo_on_log_probs_sum_and_per_token():
    s = _logps()
    loss, m = preference_loss("dpo", s, beta=0.1, loss_type="ipo")
    want, _ = dpo_loss(s.policy[0], s.policy[1], s.reference[0], s.reference[1], 0.1, "ipo")
    assert loss.item() == want.item() and {"logps/chosen", "logps/rejected"} <= m.keys()
    n = s.counts.double()
    per_token, _ = preference_loss("dpo", s.per_token(), beta=0.1, loss_type="ipo")
    want, _ = dpo_loss(s.policy[0] / n[0], s.policy[1] / n[1], s.reference[0] / n[0], s.reference[1] / n[1], 0.1,
                       "ipo")
    assert per_token.item() == pytest.approx(want.item(), rel=1e-12)


def test_mapo_rankdpo_and_sft_map_to_the_core():
    s = _errors()
    loss, m = preference_loss("mapo", s, beta=0.1, mapo_snr_value=0.5)
    want, _ = mapo_loss(-s.policy[0], -s.policy[1], 0.1, 0.5, 1000)
    assert loss.item() == want.item() and "mapo/log_odds" in m

    ranked = _errors(k=4, b=3)
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 2.0]])
    loss, m = preference_loss("rankdpo", ranked, beta=5000.0, scores=scores)
    want, _ = ranked_dpo_loss(-ranked.policy.T, -ranked.reference.T, scores, 5000.0)
    assert loss.item() == want.item()
    assert {"mse/policy", "mse/ref"} <= m.keys() and not {"mse/policy_chosen", "mse/ref_chosen"} & m.keys()

    loss, m = preference_loss("sft", s, beta=1.0)
    assert loss.item() == (-s.policy[0]).mean().item() and "mse/policy_chosen" in m
    loss, m = preference_loss("sft", _logps().rows(0), beta=1.0)
    assert loss.item() == pytest.approx(-_logps().policy[0].mean().item()) and "logps/chosen" in m


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo", "bco_pair", "sppo_hard", "nca_pair",
                                       "apo_zero", "apo_down"])
def test_at_policy_equals_reference_every_dpo_type_starts_where_its_formula_says(loss_type):
    """d = dc = dr = 0: each type's per-pair value at zero, by hand (beta 5000 on errors is 2500 on -err)."""
    s = _errors()
    same = Surrogates(s.policy, s.policy.detach().clone(), "error")
    loss, m = preference_loss("dpo", same, beta=5000.0, loss_type=loss_type)
    b = 2500.0
    want = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * b)) ** 2,
            "bco_pair": 2 * math.log(2), "sppo_hard": 2 * (1 / (2 * b)) ** 2, "nca_pair": 2 * math.log(2),
            "apo_zero": 1.0, "apo_down": 1.0}[loss_type]
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert m["rewards/accuracies"].item() == 0.5


@pytest.mark.parametrize("name, kind, loss_type, smoothing, match", [
    ("mapo", "logp", "sigmoid", 0.0, "not defined on this modality's surrogates"),
    ("rankdpo", "transition", "sigmoid", 0.0, "surrogates .transition.; valid here: spo"),
    ("dpo", "error", "nope", 0.0, "loss_type 'nope' is not one of"),
    ("mapo", "error", "ipo", 0.0, "selects a DPO variant; method 'mapo' has none"),
    ("dpo", "logp", "hinge", 0.1, "label_smoothing 0.1: only method 'dpo' with loss_type sigmoid or robust"),
    ("sft", "error", "sigmoid", 0.1, "label_smoothing 0.1"),
    ("orpo", "logp", "sigmoid", 0.0, "valid methods are dpo, mapo, rankdpo, flow_dpo, flow_rwr, rwr, spo, sft"),
])
def test_what_a_method_cannot_do_is_refused_naming_the_key(name, kind, loss_type, smoothing, match):
    with pytest.raises(ValueError, match=match):
        check_method(name, kind, loss_type, smoothing)


def test_methods_that_need_a_reference_refuse_surrogates_without_one():
    s = _errors()
    for name, spec in METHODS.items():
        if spec.needs_reference:
            kind = spec.kinds[0]  # spo is defined on transition log-densities only
            with pytest.raises(ValueError, match="needs reference surrogates"):
                preference_loss(name, Surrogates(s.policy, None, kind, num_train_timesteps=1000), beta=1.0,
                                scores=torch.zeros(6, 2))
        else:  # mapo, flow_rwr, rwr and sft need none: the same values as with a reference present
            extra = {"rewards": torch.arange(s.policy.numel(), dtype=torch.float32).view(s.policy.shape)}
            kind = spec.kinds[0]  # rwr is defined on log-probs only
            loss, _ = preference_loss(name, Surrogates(s.policy, None, kind, num_train_timesteps=1000), beta=0.1,
                                      **extra)
            with_ref, _ = preference_loss(name, Surrogates(s.policy, s.reference, kind, num_train_timesteps=1000),
                                          beta=0.1, **extra)
            assert loss.item() == with_ref.item()


def test_config_level_refusals_name_the_key():
    from mmalign.config import ConfigError, validate_config
    from mmalign.t2i.task import T2ITrainConfig

    base = {"model": {"pretrained": "x"}, "data": {"shards": "x", "resolution": 32}, "train": {"max_steps": 1}}
    with pytest.raises(ConfigError, match="model.reference 'precomputed' is not available here"):
        validate_config(T2ITrainConfig, {**base, "model": {"pretrained": "x", "reference": "precomputed"}})
    with pytest.raises(ConfigError, match="model.reference 'lora' needs model.lora"):
        validate_config(T2ITrainConfig, {**base, "model": {"pretrained": "x", "reference": "lora"}})
    cfg = validate_config(T2ITrainConfig, {**base, "method": {"name": "sft"}})
    assert cfg.reference_mode() == "none"
    cfg = validate_config(T2ITrainConfig, {**base, "model": {"pretrained": "x", "lora": {"rank": 2}}})
    assert cfg.reference_mode() == "lora"


def test_each_sequence_loss_type_gets_the_surrogate_its_definition_needs():
    """IPO (and TRL) use per-token mean log-ratios; the other types summed log-probs; sum with ipo is refused."""
    from mmalign.methods import sequence_surrogate
    from mmalign.vlm.task import VLMMethodConfig

    assert sequence_surrogate("ipo") == "mean" and sequence_surrogate("sigmoid") == "sum"
    assert sequence_surrogate("sigmoid", "mean") == "mean"
    with pytest.raises(ValueError, match="surrogate 'sum' with method.loss_type 'ipo'"):
        VLMMethodConfig(loss_type="ipo", surrogate="sum")
    assert VLMMethodConfig(loss_type="ipo").surrogate == "auto"
    # the two differ on answers of different lengths: the TRL value is the per-token one
    s = _logps()
    by_sum, _ = preference_loss("dpo", s, beta=0.1, loss_type="ipo")
    by_mean, _ = preference_loss("dpo", s.per_token(), beta=0.1, loss_type="ipo")
    assert abs(by_sum.item() - by_mean.item()) > 1e-3


def test_flow_dpo_routes_the_flow_time_to_the_beta_schedule():
    from mmalign.losses import flow_dpo_loss

    g = torch.Generator().manual_seed(0)
    err, ref = torch.rand(2, 3, generator=g), torch.rand(2, 3, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    s = Surrogates(-err, -ref, "error", t=t)
    for schedule in ("constant", "(1-t)^2"):
        loss, metrics = preference_loss("flow_dpo", s, beta=50.0, beta_schedule=schedule)
        want, _ = flow_dpo_loss(err[0], err[1], ref[0], ref[1], 50.0, t=t, beta_schedule=schedule)
        torch.testing.assert_close(loss, want)
    assert metrics["beta/effective"].item() == pytest.approx(50.0 * float(((1 - t) ** 2).mean()))


def test_flow_rwr_weights_every_item_by_the_softmax_of_its_reward():
    err = torch.tensor([[0.2, 0.4], [0.6, 0.8]])  # (K=2, B=2)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    loss, metrics = preference_loss("flow_rwr", Surrogates(-err, None, "error"), beta=1.0, rewards=rewards,
                                    temperature=0.5)
    w = torch.softmax(rewards.flatten() / 0.5, dim=0) * 4  # weights average 1
    assert loss.item() == pytest.approx(float((w * err.flatten()).mean()), rel=1e-6)
    assert metrics["rwr/ess"].item() == pytest.approx(float(1 / (torch.softmax(rewards.flatten() / 0.5, 0) ** 2).sum()),
                                                      rel=1e-6)
    with pytest.raises(ValueError, match="needs the \\(K, B\\) reward of every item"):
        preference_loss("flow_rwr", Surrogates(-err, None, "error"), beta=1.0)


def test_rwr_weights_each_items_negative_log_likelihood_by_the_softmax_of_its_reward():
    logp = torch.tensor([[-3.0, -5.0, -2.0], [-4.0, -1.0, -6.0]], dtype=torch.float64)  # (K=2, B=3)
    rewards = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.7, 0.0]], dtype=torch.float64)
    loss, metrics = preference_loss("rwr", Surrogates(logp, None, "logp"), beta=1.0, rewards=rewards,
                                    temperature=0.25)
    e = [math.exp(r / 0.25) for r in rewards.flatten().tolist()]
    p = [x / sum(e) for x in e]
    want = sum(6 * pi * -lp for pi, lp in zip(p, logp.flatten().tolist())) / 6  # weights 6·p average 1
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert metrics["nll/policy"].item() == pytest.approx(21 / 6) and "mse/policy" not in metrics
    assert metrics["rwr/ess"].item() == pytest.approx(1 / sum(q * q for q in p), rel=1e-12)
    assert metrics["rewards/mean"].item() == pytest.approx(2.4 / 6)
    with pytest.raises(ValueError, match="needs the \\(K, B\\) reward of every item"):
        preference_loss("rwr", Surrogates(logp, None, "logp"), beta=1.0)
    with pytest.raises(ValueError, match=r"surrogates \(error\); valid here: .*flow_rwr, sft$"):
        preference_loss("rwr", Surrogates(logp, None, "error"), beta=1.0, rewards=rewards)


def test_spo_in_the_method_table_is_spo_step_loss_on_transition_surrogates():
    from mmalign.losses import spo_step_loss

    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(2, 5, generator=g) * 0.05 - 1, torch.randn(2, 5, generator=g) * 0.05 - 1
    s = Surrogates(pol, ref, "transition")
    loss, metrics = preference_loss("spo", s, beta=10.0, clip_eps=0.1)
    want, _ = spo_step_loss(pol[0], ref[0], pol[1], ref[1], beta=10.0, clip_eps=0.1)
    assert loss.item() == want.item() and metrics["logps/chosen"].item() == pol[0].mean().item()
    same, _ = preference_loss("spo", Surrogates(pol, pol.clone(), "transition"), beta=10.0)
    assert same.item() == pytest.approx(math.log(2), abs=1e-7)
    with pytest.raises(ValueError, match="not defined on this modality's surrogates"):
        preference_loss("spo", Surrogates(pol, ref, "error"), beta=10.0)


def test_rankdpo_on_log_probs_is_the_sequence_ranked_loss_of_the_item_major_surrogates():
    from mmalign.losses import ranked_sequence_dpo_loss

    torch.manual_seed(0)
    policy, reference = torch.randn(4, 3) - 20, torch.randn(4, 3) - 20  # (K items, B prompts)
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])  # (B, K)
    loss, metrics = preference_loss("rankdpo", Surrogates(policy, reference, "logp"), beta=0.2, scores=scores)
    expected, _ = ranked_sequence_dpo_loss(policy.T, reference.T, scores, beta=0.2)
    assert loss.item() == expected.item() and "logps/policy" in metrics
    assert check_method("rankdpo", "logp").default_beta["logp"] == 0.1
