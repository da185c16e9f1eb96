"""The rate read-out's calibration: ground-truth gains on synthetic paths, and the model wiring."""

import torch

from neuroformer.data.tokenizer import N_SPECIAL
from neuroformer.models.calibration import calibrate_readout, shrinkage_gains
from neuroformer.models.neuroformer import MAX_LOG_RATE, Neuroformer, RatePaths
from tests.test_model import V, make_batch, make_model


def poisson_nll(log_rates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return (log_rates.exp() - counts * log_rates)[..., N_SPECIAL:].sum()


def test_gains_drop_a_noise_filter_shrink_an_overdispersed_path_and_keep_a_true_one():
    """Known truth: units 0-9 are driven by the stimulus, 10-19 are not but their stimulus path holds
    a filter fitted to noise; every unit's attention path varies 3x more than its true modulation."""
    g = torch.Generator().manual_seed(0)
    windows, bins, units = 4000, 5, 20
    mean = torch.full((units,), -2.0)
    true_attention = 0.3 * torch.randn(windows, bins, units, generator=g)
    true_stimulus = 0.5 * torch.randn(windows, 1, units, generator=g)
    true_stimulus[..., 10:] = 0
    noise_filter = 0.5 * torch.randn(windows, 1, units, generator=g)
    pad = lambda t: torch.cat([torch.zeros(*t.shape[:-1], N_SPECIAL), t], -1)  # noqa: E731  special columns first
    paths = RatePaths(pad(mean + 3 * true_attention),
                      pad(torch.cat([true_stimulus[..., :10], noise_filter[..., 10:]], -1)),
                      pad(torch.zeros(windows, 1, units)))
    truth = pad(mean + true_attention + true_stimulus)
    fit, held_out = (torch.poisson(truth.exp(), generator=g) for _ in range(2))

    result = shrinkage_gains(paths, fit)
    gain_a, gain_s = result.gain[:, N_SPECIAL:]
    assert (gain_s[:10] == 1).all() and (gain_s[10:] == 0).all(), gain_s
    assert ((gain_a == 0.25) | (gain_a == 0.5)).all(), gain_a  # the truth is 1/3
    assert result.nll_after < result.nll_before

    calibrated = result.gain[0] * paths.attention + result.gain[1] * paths.stimulus + paths.behavior + result.offset
    raw = sum(paths)
    # Held-out counts from the same rates: the calibrated read-out is closer to the truth.
    assert poisson_nll(calibrated, held_out) < poisson_nll(raw, held_out)
    # Shrinkage moves no unit's mean log-rate.
    torch.testing.assert_close(calibrated.mean((0, 1)), raw.mean((0, 1)), atol=1e-5, rtol=0)


def test_the_model_applies_its_calibration():
    model = make_model(rate_bins=4, rate_skip=2)
    with torch.no_grad():
        for skip in (model.rate_frames, model.rate_behavior):
            skip.weight.normal_(std=0.3)
    batch = make_batch(b=6)
    counts = torch.poisson(torch.full((6, 4, V), 0.2), generator=torch.Generator().manual_seed(1))
    raw = model.rates(batch.inputs)
    paths = model.context_rate_paths(batch.inputs)
    torch.testing.assert_close(raw, sum(paths).clamp(max=MAX_LOG_RATE).exp())

    result = calibrate_readout(model, [batch._replace(counts=counts)])
    torch.testing.assert_close(model.rate_gain, result.gain)
    expected = (result.gain[0] * paths.attention + result.gain[1] * paths.stimulus + paths.behavior
                + result.offset).clamp(max=MAX_LOG_RATE).exp()
    torch.testing.assert_close(model.rates(batch.inputs), expected)
    # Token predictions do not depend on the calibration.
    uncalibrated = make_model(rate_bins=4, rate_skip=2)
    torch.testing.assert_close(model(batch.inputs).id_logits, uncalibrated(batch.inputs).id_logits)

    # A state dict saved before the calibration existed loads as the identity.
    old = {k: v for k, v in model.state_dict().items() if k not in ("rate_gain", "rate_offset")}
    reloaded = Neuroformer(model.config).eval()
    reloaded.load_state_dict(old)
    torch.testing.assert_close(reloaded.rates(batch.inputs), raw)


def test_no_validation_windows_leave_the_model_uncalibrated():
    model = make_model(rate_bins=4, rate_skip=2)
    assert calibrate_readout(model, []) is None
    assert (model.rate_gain == 1).all() and (model.rate_offset == 0).all()
