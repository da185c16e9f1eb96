"""Model: causality, PAD masking, contrastive loss, parameter groups."""

import pytest
import torch

from neuroformer.data.dataset import Batch
from neuroformer.data.tokenizer import EOS, N_SPECIAL, PAD, SOS
from neuroformer.errors import ConfigError
from neuroformer.models.neuroformer import Neuroformer, NeuroformerConfig

T, P, V, DT = 12, 20, 10 + N_SPECIAL, 13
# The two context designs: the decoder attends to every context token, or to latents that read them.
DESIGNS = pytest.mark.parametrize("design", [{}, {"n_latents": 4, "n_latent_layer": 1},
                                             {"n_latents": 4, "n_latent_layer": 1, "past_direct": True}],
                                  ids=["tokens", "latents", "latents+past"])


def make_model(**kw) -> Neuroformer:
    cfg = NeuroformerConfig(id_vocab_size=V, dt_vocab_size=DT, block_size=T, past_block_size=P, n_embd=32,
                            n_head=4, n_layer=2, dropout=0.0, n_frames=2, frame_shape=(8, 8), patch=(1, 4, 4),
                            n_behavior=1, behavior_steps=4, **kw)
    torch.manual_seed(0)
    return Neuroformer(cfg).eval()


def make_batch(b=3, n_cur=7, n_past=11, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((b, T), PAD)
    dts = torch.full((b, T), PAD)
    ids[:, 0], dts[:, 0] = SOS, SOS
    ids[:, 1:n_cur] = torch.randint(N_SPECIAL, V, (b, n_cur - 1), generator=g)
    dts[:, 1:n_cur] = torch.randint(N_SPECIAL, DT, (b, n_cur - 1), generator=g).sort(dim=1).values
    tgt_ids, tgt_dts = torch.full_like(ids, PAD), torch.full_like(dts, PAD)
    tgt_ids[:, : n_cur - 1], tgt_dts[:, : n_cur - 1] = ids[:, 1:n_cur], dts[:, 1:n_cur]
    tgt_ids[:, n_cur - 1], tgt_dts[:, n_cur - 1] = EOS, EOS
    past_ids = torch.full((b, P), PAD)
    past_dts = torch.full((b, P), PAD)
    past_ids[:, 0], past_dts[:, 0] = SOS, SOS
    past_ids[:, 1:n_past] = torch.randint(N_SPECIAL, V, (b, n_past - 1), generator=g)
    past_dts[:, 1:n_past] = torch.randint(N_SPECIAL, DT, (b, n_past - 1), generator=g)
    return Batch(ids, dts, tgt_ids, tgt_dts, past_ids, past_dts, torch.randn(b, 2, 8, 8, generator=g),
                 torch.randn(b, 4, 1, generator=g), torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.long))


@DESIGNS
def test_changing_a_future_token_never_changes_earlier_predictions(design):
    model, batch = make_model(**design), make_batch()
    out = model(batch.inputs)
    for k in range(1, 6):
        ids = batch.ids.clone()
        ids[:, k] = (ids[:, k] - N_SPECIAL + 1) % (V - N_SPECIAL) + N_SPECIAL
        dts = batch.dts.clone()
        dts[:, k] = (dts[:, k] - N_SPECIAL + 3) % (DT - N_SPECIAL) + N_SPECIAL
        changed = model(batch.inputs._replace(ids=ids, dts=dts))
        torch.testing.assert_close(changed.id_logits[:, :k], out.id_logits[:, :k], rtol=0, atol=1e-6)
        torch.testing.assert_close(changed.dt_logits[:, :k], out.dt_logits[:, :k], rtol=0, atol=1e-6)
        assert not torch.allclose(changed.id_logits[:, k], out.id_logits[:, k])  # the change is seen


@DESIGNS
def test_padding_never_changes_outputs(design):
    model, batch = make_model(**design), make_batch(n_cur=5, n_past=9)
    out = model(batch.inputs)
    # Garbage in PAD slots' dt tokens and a different amount of padding change nothing real.
    noisy_past_dts = torch.where(batch.past_ids == PAD, torch.randint_like(batch.past_dts, N_SPECIAL, DT), batch.past_dts)
    changed = model(batch.inputs._replace(past_dts=noisy_past_dts))
    torch.testing.assert_close(changed.id_logits[:, :5], out.id_logits[:, :5], rtol=0, atol=1e-6)
    shorter = model(batch.inputs._replace(ids=batch.ids[:, :6], dts=batch.dts[:, :6], past_ids=batch.past_ids[:, :9],
                                   past_dts=batch.past_dts[:, :9]))
    torch.testing.assert_close(shorter.id_logits[:, :5], out.id_logits[:, :5], rtol=1e-5, atol=1e-5)
    # ...while a real past token does change the outputs.
    past = batch.past_ids.clone()
    past[:, 1] = (past[:, 1] - N_SPECIAL + 1) % (V - N_SPECIAL) + N_SPECIAL
    assert not torch.allclose(model(batch.inputs._replace(past_ids=past)).id_logits[:, :5], out.id_logits[:, :5])


@DESIGNS
def test_every_modality_reaches_the_prediction(design):
    model, batch = make_model(**design), make_batch()
    out = model(batch.inputs).id_logits
    assert not torch.allclose(model(batch.inputs._replace(frames=batch.frames + 1)).id_logits, out)
    assert not torch.allclose(model(batch.inputs._replace(behavior=batch.behavior + 1)).id_logits, out)


def test_latents_replace_the_context_tokens_as_the_decoders_memory():
    model, batch = make_model(n_latents=4, n_latent_layer=1), make_batch()
    memory, keep, parts = model.encode_context(batch.inputs)
    assert memory.shape == (3, 4, 32) and keep.all()
    assert sum(p.shape[1] for p in parts.values()) == P + 8 + 4  # past, 2 x 2 x 2 patches, behaviour
    assert model.start_decoding(batch.inputs).cross_kv[0][0].shape == (3, 4, 4, 8)  # (B, h, latents, C/h)
    with pytest.raises(ConfigError, match="perturbation"):
        model.forward_with_attention(batch.inputs)
    # past_direct: the decoder also attends to the P past tokens, with keys shared by every block.
    model = make_model(n_latents=4, n_latent_layer=1, past_direct=True)
    kvs, keep, _ = model.cross_keys_values(batch.inputs)
    assert kvs[0][0].shape == (3, 4, 4 + P, 8) and keep.shape == (3, 4 + P)
    torch.testing.assert_close(kvs[0][0][:, :, 4:], kvs[1][0][:, :, 4:])
    assert (keep[:, 4:] == (batch.past_ids != PAD)).all()


def test_losses_and_contrastive_gradients():
    model, batch = make_model(), make_batch(b=4)
    model.train()
    out = model(batch.inputs, contrastive=True)
    assert out.neural.shape == out.stimulus.shape == out.behavior.shape == (4, 64)
    torch.testing.assert_close(out.neural.norm(dim=-1), torch.ones(4))
    losses = model.losses(out, batch.target_ids, batch.target_dts)
    assert set(losses) == {"id_ce", "dt_ce", "contrastive"}
    # id_ce is the mean over non-PAD targets only.
    real = batch.target_ids != PAD
    manual = torch.nn.functional.cross_entropy(out.id_logits[real], batch.target_ids[real])
    torch.testing.assert_close(losses["id_ce"], manual)
    losses["contrastive"].backward()
    assert model.stimulus_proj.weight.grad.abs().sum() > 0 and model.neural_proj.weight.grad.abs().sum() > 0


def test_decay_groups_cover_every_parameter_once():
    model = make_model()
    decay, no_decay = model.param_groups(0.1)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p is model.id_embedding.weight for p in no_decay["params"])


def test_attention_dropout_is_its_own_setting():
    """``attn_dropout`` alone randomises training-mode attention; ``dropout`` stays off here."""
    batch = make_batch()
    for attn_dropout, random in ((0.0, False), (0.5, True)):
        model = make_model(attn_dropout=attn_dropout).train()
        a, b = model(batch.inputs).id_logits, model(batch.inputs).id_logits
        assert torch.equal(a, b) is not random, attn_dropout
        assert all(block.self_attn.dropout == attn_dropout for block in model.blocks)
    model.eval()
    assert torch.equal(model(batch.inputs).id_logits, model(batch.inputs).id_logits)


def test_rate_readout_forecasts_from_the_context_alone_and_learns_counts():
    model, batch = make_model(rate_bins=4, rate_skip=2), make_batch()
    out = model(batch.inputs)
    assert out.log_rates.shape == (3, 4, V)
    # The read-out never sees the current window's tokens: it is a forecast of the whole window.
    other = model(batch.inputs._replace(ids=batch.ids.flip(0), dts=batch.dts.flip(0)))
    torch.testing.assert_close(other.log_rates, out.log_rates, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.rates(batch.inputs), out.log_rates.exp(), rtol=1e-6, atol=1e-7)
    # ...but sees every modality, the stimulus through its skip path too.
    for field, value in (("frames", batch.frames + 1), ("behavior", batch.behavior + 1),
                         ("past_ids", batch.past_ids.roll(1, dims=0))):
        assert not torch.allclose(model(batch.inputs._replace(**{field: value})).log_rates, out.log_rates), field
    # Its Poisson loss fits known counts: a few steps move the rates towards the target.
    counts = torch.zeros(3, 4, V)
    counts[:, :, N_SPECIAL + 2] = 3.0
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model.losses(model(batch.inputs), batch.target_ids, batch.target_dts, counts)["rate_nll"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    rates = model.eval().rates(batch.inputs)
    assert (rates[..., N_SPECIAL + 2] > 1.5).all() and (rates[..., N_SPECIAL + 3] < 0.05).all()
    assert "rate_nll" not in make_model().losses(make_model()(batch.inputs), batch.target_ids, batch.target_dts, counts)


def test_rate_l2_is_the_squared_weights_of_the_skip_paths_alone():
    model, batch = make_model(rate_bins=4, rate_skip=2), make_batch()
    with torch.no_grad():
        for skip in (model.rate_frames, model.rate_behavior):
            skip.weight.normal_()
    counts = torch.ones(3, 4, V)
    penalty = model.losses(model(batch.inputs), batch.target_ids, batch.target_dts, counts)["rate_l2"]
    skips = (model.rate_frames.weight, model.rate_behavior.weight)
    torch.testing.assert_close(penalty, sum(w.square().sum() for w in skips))
    penalty.backward()
    for w in skips:
        torch.testing.assert_close(w.grad, 2 * w.detach())
    assert model.rate_head.weight.grad is None  # the attention read-out is not penalised
    no_skip = make_model(rate_bins=4)
    assert "rate_l2" not in no_skip.losses(no_skip(batch.inputs), batch.target_ids, batch.target_dts, counts)
