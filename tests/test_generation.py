"""Generation: the KV cache reproduces the full forward pass, samples obey the constraints,
closed loop feeds the model its own spikes, and the CLI writes what it generated."""


import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from neuroformer.data.tokenizer import EOS, N_SPECIAL, PAD, SOS
from neuroformer.inference import generate
from neuroformer.inference.generate import SamplingConfig, filter_logits, sample_windows, simulate
from neuroformer.registry import LoadedModel
from neuroformer.registry.mlflow_model import save_model_files
from tests.configs import compose
from tests.test_model import DESIGNS, make_batch, make_model

N_BINS = 4  # current-window bins of the toy model (its dt vocabulary holds 10 bins)


@pytest.fixture(scope="module")
def sim_setup(small_sim_path, tmp_path_factory):
    """A small model with the spec of the fixture recording, and the composed training config."""
    tmp = tmp_path_factory.mktemp("gen")
    cfg = compose(["model.n_embd=32", "model.n_head=2", "model.n_layer=2", "model.patch=[1,8,8]"], tmp,
                  sim_path=small_sim_path)
    dm = instantiate(cfg.data)
    dm.setup()
    torch.manual_seed(0)
    return instantiate(cfg.model)(spec=dm.spec).eval(), dm, cfg


@DESIGNS
def test_decode_step_matches_forward_in_any_chunking(design):
    model, batch = make_model(**design), make_batch(n_cur=7, n_past=9)
    with torch.no_grad():
        full = model(batch.inputs)
        for chunks in ([1] * 12, [5, 7], [12]):
            cache = model.start_decoding(batch.inputs)
            outs, start = [], 0
            for n in chunks:
                outs.append(model.decode_step(cache, batch.ids[:, start : start + n], batch.dts[:, start : start + n]))
                start += n
            torch.testing.assert_close(torch.cat([o[0] for o in outs], 1), full.id_logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.cat([o[1] for o in outs], 1), full.dt_logits, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="block size"):
            model.decode_step(cache, batch.ids[:, :1], batch.dts[:, :1])


def test_static_cache_matches_concatenating_blocks():
    """decode_step's in-place buffers hold what DecoderBlock.forward's concatenated keys/values do, and give its outputs."""
    model, batch = make_model(), make_batch(n_cur=7)
    with torch.no_grad():
        context, keep, _ = model.encode_context(batch.inputs)
        cross_mask = keep[:, None, None, :]
        cache = model.start_decoding(batch.inputs)
        past = [None] * len(model.blocks)
        for t in range(batch.ids.shape[1]):
            ids, dts = batch.ids[:, t : t + 1], batch.dts[:, t : t + 1]
            mask = (batch.ids[:, : t + 1] != PAD)[:, None, None, :]
            h = model.embed(ids, dts, model.current_pos[t:])
            for i, block in enumerate(model.blocks):
                h, past[i], _ = block(h, mask, block.cross_attn.keys_values(context), cross_mask, past[i])
            id_logits, dt_logits = model.decode_step(cache, ids, dts)
            torch.testing.assert_close(id_logits, model.id_head(model.ln_f(h)), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dt_logits, model.dt_head(model.ln_f(h)), rtol=1e-5, atol=1e-5)
            assert cache.length == t + 1
            for (k, v), buffers in zip(past, cache.self_kv):
                torch.testing.assert_close(buffers[0, :, :, : t + 1], k, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(buffers[1, :, :, : t + 1], v, rtol=1e-6, atol=1e-6)


def test_start_decoding_leaves_out_the_all_pad_past_tail():
    model, batch = make_model(), make_batch(n_cur=7, n_past=5)
    batch2 = make_batch(n_cur=7, n_past=9)
    x = batch.inputs._replace(past_ids=torch.cat([batch.past_ids, batch2.past_ids]),
                              past_dts=torch.cat([batch.past_dts, batch2.past_dts]),
                              frames=torch.cat([batch.frames, batch2.frames]),
                              behavior=torch.cat([batch.behavior, batch2.behavior]))
    with torch.no_grad():
        cache = model.start_decoding(x)
    n_ctx = 9 + model.config.n_patches + model.config.behavior_steps  # the longest past: SOS + 8 spikes
    assert cache.cross_kv[0][0].shape[2] == n_ctx and cache.cross_mask.shape == (6, 1, 1, n_ctx)
    assert torch.isinf(cache.cross_mask[:3, 0, 0, 5:9]).all() and (cache.cross_mask[3:, 0, 0, :9] == 0).all()


def test_forward_with_attention_returns_the_weights_forward_uses():
    model, batch = make_model(), make_batch(n_cur=7, n_past=11)
    with torch.no_grad():
        out, weights = model.forward_with_attention(batch.inputs)
        torch.testing.assert_close(out.id_logits, model(batch.inputs).id_logits, rtol=1e-5, atol=1e-5)
    n_ctx = batch.past_ids.shape[1] + model.config.n_patches + model.config.behavior_steps
    assert len(weights) == model.config.n_layer
    for w in weights:
        assert w.shape == (3, model.config.n_head, batch.ids.shape[1], n_ctx)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        assert (w[..., 11 : batch.past_ids.shape[1]] == 0).all()  # PAD past tokens get nothing
        assert (w[..., :11] > 0).all()


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5, top_p=0.8), SamplingConfig(temperature=0)]
)
def test_cache_and_full_forward_draw_identical_samples(sampling):
    model, batch = _long_window_model(), make_batch(b=6)
    run = lambda seed, cache: sample_windows(  # noqa: E731
        model, batch.inputs, N_BINS, sampling, torch.Generator().manual_seed(seed), use_cache=cache)
    cached, full = run(1, True), run(1, False)
    assert torch.equal(cached.ids, full.ids) and torch.equal(cached.dts, full.dts)
    assert torch.equal(cached.counts, full.counts) and cached.steps == full.steps
    assert cached.counts.min() > 2
    if sampling.temperature > 0:  # the seed matters, so equality above is not a coincidence
        assert not torch.equal(run(2, True).ids, cached.ids)


def test_forced_length_gives_exactly_that_many_spikes_never_eos():
    model, batch = make_model(), make_batch(b=8)
    run = lambda cache, length: sample_windows(  # noqa: E731
        model, batch.inputs, N_BINS, SamplingConfig(), torch.Generator().manual_seed(0), use_cache=cache, length=length)
    free = run(True, None)
    assert free.ended.all() and free.counts.max() < 9  # left alone, this model ends its windows early
    for length in (1, 9, 11):
        out = run(True, length)
        assert out.steps == length and (out.counts == length).all() and not out.ended.any()
        spikes_ids, spikes_dts = out.ids[:, 1 : length + 1], out.dts[:, 1 : length + 1]
        assert (spikes_ids >= N_SPECIAL).all() and (out.ids[:, length + 1 :] == PAD).all()
        bins = spikes_dts - N_SPECIAL
        assert ((bins >= 0) & (bins < N_BINS)).all() and (bins.diff(dim=1) >= 0).all()
        full = run(False, length)
        assert torch.equal(out.ids, full.ids) and torch.equal(out.dts, full.dts)
    for bad in (0, 12):
        with pytest.raises(ValueError, match="length"):
            run(True, bad)


def test_filter_logits_top_k_top_p_and_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, SamplingConfig(top_k=2))[0, 2:]).all()
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(top_p=0.7)))[0]
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7 <= 0.75
    kept = torch.isfinite(filter_logits(logits, SamplingConfig(top_p=0.4)))[0]
    assert kept.tolist() == [True, False, False, False]  # the top token always survives
    hot = filter_logits(logits, SamplingConfig(temperature=2.0)).softmax(-1)
    torch.testing.assert_close(hot, (logits / 2).softmax(-1))
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


def _long_window_model():
    """The toy model with EOS made unlikely (by ~6 nats), so that windows hold many spikes."""
    model = make_model()
    with torch.no_grad():
        model.ln_f.bias.fill_(1.0)  # a constant direction in the final features: shifting a head row shifts its logit
        model.id_head.weight[EOS] -= 0.2
        model.dt_head.weight[EOS] -= 0.2
    return model


def _adversarial_model():
    """A toy model that prefers forbidden tokens: PAD/SOS as IDs, PAD/SOS and out-of-window dts."""
    model = _long_window_model()
    with torch.no_grad():
        model.id_head.weight[[PAD, SOS]] += 0.2
        model.dt_head.weight.mul_(20.0)  # peaky dt preferences that change with position
        model.dt_head.weight[[PAD, SOS]] += 0.2
    return model


def test_samples_obey_constraints_and_round_trip_through_the_tokenizer():
    from neuroformer.data.tokenizer import SpikeTokenizer

    model, batch = _adversarial_model(), make_batch(b=16)
    unit_tokens = torch.tensor([3, 5, 6, 8, 9, 11])
    out = sample_windows(model, batch.inputs, N_BINS, SamplingConfig(), torch.Generator().manual_seed(0), unit_tokens)
    tok = SpikeTokenizer(window=N_BINS * 0.005, resolution=0.005, max_tokens=12)
    assert out.counts.sum() > 30
    for ids, dts, n in zip(out.ids, out.dts, out.counts):
        assert ids[0] == SOS and dts[0] == SOS and (ids[n + 1 :] == PAD).all() and (dts[n + 1 :] == PAD).all()
        spikes_ids, spikes_dts = ids[1 : n + 1], dts[1 : n + 1]
        assert torch.isin(spikes_ids, unit_tokens).all()
        bins = spikes_dts - N_SPECIAL
        assert ((bins >= 0) & (bins < N_BINS)).all() and (bins.diff() >= 0).all()
        # Decoding and re-encoding gives the same tokens: the sample is in canonical order.
        times, units = tok.decode(ids.numpy(), dts.numpy(), 10.0)
        enc = tok.encode(times + 1e-9, units, np.array([10.0]), tok.window, 11)
        assert enc.ids[0, :n].tolist() == spikes_ids.tolist() and enc.dts[0, :n].tolist() == spikes_dts.tolist()
    # The constraints were binding: unconstrained, the model wanted forbidden tokens.
    with torch.no_grad():
        logits = model(batch.inputs._replace(ids=out.ids, dts=out.dts))
    assert torch.isin(logits.id_logits.argmax(-1), torch.tensor([PAD, SOS])).any()
    wanted_bin = logits.dt_logits.argmax(-1) - N_SPECIAL
    previous_bin = torch.where(out.dts >= N_SPECIAL, out.dts - N_SPECIAL, 0)
    live = torch.arange(out.ids.shape[1]) < out.counts[:, None]
    assert ((wanted_bin < previous_bin) | (wanted_bin >= N_BINS))[live].any()


def _spy_on_contexts(model, monkeypatch) -> list:
    """Record the past tokens of every window the model starts decoding."""
    seen, start = [], model.start_decoding

    def recording(batch):
        seen.append((batch.past_ids.clone(), batch.past_dts.clone()))
        return start(batch)

    monkeypatch.setattr(model, "start_decoding", recording)
    return seen


def test_closed_loop_feeds_the_generated_spikes_back_as_past(sim_setup, monkeypatch):
    model, dm, _ = sim_setup
    rec, spec = dm.recordings[0], dm.spec
    tok = spec.tokenizer
    start = float(dm.datasets["test"].t0[0])
    starts, n_windows = np.array([start, start]), 6
    seen = _spy_on_contexts(model, monkeypatch)
    trains = simulate(model, spec, rec, starts, n_windows, generator=torch.Generator().manual_seed(0))
    vocab_of_row = spec.vocab.indices(rec.units.names)
    for b, train in enumerate(trains):
        assert len(train.times) > 0 and (np.diff(train.times) >= 0).all()
        assert ((train.times >= start) & (train.times < start + n_windows * tok.window)).all()
        assert ((train.units >= 0) & (train.units < rec.units.n_units)).all()
        # From the window whose whole past was generated on, the past tokens are the generated spikes.
        for w in range(round(tok.past_window / tok.window), n_windows):
            t0 = start + w * tok.window
            times, units = tok.decode(seen[w][0][b].numpy(), seen[w][1][b].numpy(), t0 - tok.past_window)
            mine = (train.times >= t0 - tok.past_window) & (train.times < t0)
            expected = list(zip(np.floor((train.times[mine] - t0 + tok.past_window) / tok.resolution).astype(int),
                                vocab_of_row[train.units[mine]]))  # in the order they were generated
            got = list(zip(np.round((times - t0 + tok.past_window) / tok.resolution).astype(int), units))
            assert got == expected
    # The first window sees the true past; in open loop every window does.
    true_past = dm.datasets["test"].__getitems__([0]).past_ids[0]
    assert torch.equal(seen[0][0][0], true_past)
    seen.clear()
    simulate(model, spec, rec, starts[:1], 4, generator=torch.Generator().manual_seed(0), closed_loop=False)
    t0s = start + tok.window * np.arange(4)
    from neuroformer.data.dataset import WindowDataset

    truth = WindowDataset([rec], spec, [t0s]).__getitems__(list(range(4))).past_ids
    assert all(torch.equal(seen[w][0][0], truth[w]) for w in range(4))


def test_cli_writes_the_generated_spikes(sim_setup, small_sim_path, tmp_path, capsys):
    model, dm, cfg = sim_setup
    folder = tmp_path / "model"
    save_model_files(folder, LoadedModel(model, dm.spec, "neuroformer", OmegaConf.to_yaml(cfg, resolve=True)))
    out = tmp_path / "gen.npz"
    generate.main(["--model", str(folder), "--data", str(small_sim_path), "--out", str(out), "--n-windows", "4",
                   "--samples", "2", "--top-k", "20"])
    saved = np.load(out)
    lo, hi = saved["interval"]
    assert hi - lo == pytest.approx(4 * dm.spec.tokenizer.window)
    assert lo == pytest.approx(dm.datasets["test"].t0[0])  # the test block's first window
    assert ((saved["times"] >= lo) & (saved["times"] < hi)).all()
    assert set(np.unique(saved["sample"])) <= {0, 1} and len(saved["unit_names"]) == 40
    assert saved["units"].max() < 40
    assert "generated spikes per sample" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_decoding_draws_the_eager_samples():
    """sample_windows(compile=True) runs inductor programs of start_decoding and decode_tokens; same samples."""
    model, batch = _long_window_model(), make_batch(b=3)
    run = lambda compile: sample_windows(  # noqa: E731
        model, batch.inputs, N_BINS, SamplingConfig(), torch.Generator().manual_seed(1), compile=compile)
    eager, compiled = run(False), run(True)
    assert compiled.counts.min() > 2  # several decoding steps, each a new position
    assert torch.equal(compiled.ids, eager.ids) and torch.equal(compiled.dts, eager.dts)
    with torch.no_grad():  # new weights: the kept programs read them, they did not bake the old ones in
        model.id_head.weight.mul_(4.0)
        model.blocks[0].mlp[0].bias.add_(0.5)
    eager2, compiled2 = run(False), run(True)
    assert not torch.equal(eager2.ids, eager.ids)
    assert torch.equal(compiled2.ids, eager2.ids) and torch.equal(compiled2.dts, eager2.dts)
