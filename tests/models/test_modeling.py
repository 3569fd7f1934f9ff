"""Behaviour of the SANE model: losses, masking, attention backends, loading and Hub round trips.

Tiny configurations only (CPU, a few seconds in all but the remote-code subprocess).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from sane_hf import SaneConfig, SaneModel
from sane_hf.models.sane.modeling_sane import (
    SaneDecoderModel,
    SaneEncoderModel,
    SaneModelOutput,
    masked_mse,
    nt_xent,
)

TOKENSIZE = 289


def tiny_model(seed: int = 0, **overrides) -> SaneModel:
    torch.manual_seed(seed)
    return SaneModel(SaneConfig.from_preset("tiny", **overrides)).eval()


def make_batch(batch_size: int = 4, window: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random windows of rows 400 values long: every second token is a row's last chunk, 111
    real values followed by zero padding."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch_size, window, TOKENSIZE, generator=generator)
    value_mask = torch.ones(batch_size, window, TOKENSIZE, dtype=torch.bool)
    value_mask[:, 1::2, 111:] = False
    tokens = tokens.masked_fill(~value_mask, 0.0)
    start = torch.randint(0, 100, (batch_size, 1), generator=generator)
    global_index = start + torch.arange(window)
    positions = torch.stack([global_index, global_index // 8, (global_index // 2) % 4], dim=-1)
    return {"tokens": tokens, "positions": positions, "value_mask": value_mask}


def two_views(batch: dict[str, torch.Tensor], noise: float = 0.1) -> dict[str, torch.Tensor]:
    """Two noisy views of each window stacked on the batch axis, with clean targets."""
    generator = torch.Generator().manual_seed(1)
    clean = batch["tokens"].repeat(2, 1, 1)
    noisy = clean * (1 + noise * torch.randn(clean.shape, generator=generator))
    return {
        "tokens": noisy,
        "positions": batch["positions"].repeat(2, 1, 1),
        "target_tokens": clean,
        "value_mask": batch["value_mask"].repeat(2, 1, 1),
        "num_views": 2,
    }


# ----- configuration -----


def test_presets_follow_the_reference_shapes():
    cnn = SaneConfig.from_preset("cnn")
    assert (cnn.tokensize, cnn.windowsize, cnn.d_model, cnn.n_layers) == (289, 64, 1024, 8)
    assert (cnn.n_heads, cnn.latent_dim) == (8, 128)
    resnet = SaneConfig.from_preset("resnet18", dropout=0.1)
    assert (resnet.tokensize, resnet.windowsize, resnet.d_model, resnet.n_heads) == (
        288,
        256,
        2048,
        16,
    )
    assert resnet.max_positions[0] > 53_704  # every token of a ResNet-18 with BatchNorm
    assert resnet.dropout == 0.1
    with torch.device("meta"):  # the reference models: 202.5M and 865M parameters
        assert SaneModel(cnn).num_parameters() == pytest.approx(202.5e6, rel=0.01)
        assert SaneModel(resnet).num_parameters() == pytest.approx(865e6, rel=0.002)


def test_config_rejects_bad_values_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="unknown SANE preset"):
        SaneConfig.from_preset("vit")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        SaneConfig.from_preset("tiny", n_heads=3)
    with pytest.raises(ValueError, match="gamma"):
        SaneConfig.from_preset("tiny", gamma=1.5)
    with pytest.raises(ValueError, match="three positive"):
        SaneConfig.from_preset("tiny", max_positions=[10, 10, 0])
    config = SaneConfig.from_preset("tiny", zoo_dataset="fake-user/zoo")
    config.save_pretrained(tmp_path)
    loaded = SaneConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.max_positions == (1024, 64, 256)


# ----- forward and losses -----


def test_loss_combines_both_terms_with_gamma():
    model = tiny_model(gamma=0.25)
    output = model(**two_views(make_batch()))
    assert isinstance(output, SaneModelOutput)
    assert list(output.keys())[:3] == ["loss", "reconstruction_loss", "contrastive_loss"]
    expected = 0.25 * output.contrastive_loss + 0.75 * output.reconstruction_loss
    torch.testing.assert_close(output.loss, expected)
    assert output.latents.shape == (8, 6, 16)
    assert output.reconstructions.shape == (8, 6, TOKENSIZE)
    assert output.projections.shape == (8, 16)

    single_view = model(**{**two_views(make_batch()), "num_views": 1})
    assert single_view.contrastive_loss is None
    torch.testing.assert_close(single_view.loss, single_view.reconstruction_loss)
    assert model(**make_batch()).loss is None  # no targets, one view: nothing to score


def test_nt_xent_matches_the_closed_form():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    projections = torch.stack([a, b, 2 * a, b])  # views: (a, 2a) and (b, b); a is orthogonal to b
    temperature = 0.5
    # each row: positive similarity 1/t, two negatives of similarity 0
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    assert nt_xent(projections, temperature).item() == pytest.approx(expected, rel=1e-6)
    swapped = torch.stack([a, b, b, 2 * a])  # positives now orthogonal: a worse loss
    assert nt_xent(swapped, temperature) > nt_xent(projections, temperature)


def test_masked_mse_ignores_padded_values():
    batch = make_batch()
    model = tiny_model()
    inputs = {**batch, "target_tokens": batch["tokens"]}
    loss = model(**inputs).reconstruction_loss

    padded = ~batch["value_mask"]
    garbage = inputs["target_tokens"].masked_fill(padded, float("nan"))
    garbage_loss = model(**{**inputs, "target_tokens": garbage}).reconstruction_loss
    assert garbage_loss == loss
    garbage_loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and all(gradient.isfinite().all() for gradient in gradients)

    real = inputs["target_tokens"].clone()
    real[0, 0, 0] += 1.0
    assert model(**{**inputs, "target_tokens": real}).reconstruction_loss != loss

    reconstructions = torch.zeros(1, 1, 4)
    targets = torch.tensor([[[1.0, 2.0, 100.0, -50.0]]])
    mask = torch.tensor([[[True, True, False, False]]])
    assert masked_mse(reconstructions, targets, mask).item() == pytest.approx(2.5)


def test_padding_tokens_change_nothing_about_real_tokens():
    batch = make_batch()
    attention_mask = torch.ones(4, 6, dtype=torch.bool)
    attention_mask[1, 4:] = False
    attention_mask[3, 2:] = False
    inputs = {**two_views(batch), "attention_mask": attention_mask.repeat(2, 1)}
    model = tiny_model()
    output = model(**inputs)

    pad = ~inputs["attention_mask"]
    scrambled = inputs["tokens"].clone()
    scrambled[pad] = torch.randn(int(pad.sum()), TOKENSIZE) * 100
    targets = inputs["target_tokens"].clone()
    targets[pad] = -7.0
    changed = model(**{**inputs, "tokens": scrambled, "target_tokens": targets})

    torch.testing.assert_close(changed.latents[~pad], output.latents[~pad])
    torch.testing.assert_close(changed.projections, output.projections)
    torch.testing.assert_close(changed.loss, output.loss)
    assert not torch.allclose(changed.latents[pad], output.latents[pad])


def test_projection_head_handles_any_window_length():
    model = tiny_model()
    short, long = make_batch(window=5), make_batch(window=12)
    assert model(**short).projections.shape == model(**long).projections.shape == (4, 16)

    # A short window padded to the long length projects exactly like the short window.
    padded_tokens = long["tokens"].clone()
    padded_tokens[:, :5] = short["tokens"]
    padded_positions = long["positions"].clone()
    padded_positions[:, :5] = short["positions"]
    attention_mask = torch.zeros(4, 12, dtype=torch.bool)
    attention_mask[:, :5] = True
    padded = model(padded_tokens, padded_positions, attention_mask)
    torch.testing.assert_close(padded.projections, model(**short).projections)


@pytest.mark.parametrize("padding", [False, True])
def test_eager_and_sdpa_attention_agree(padding):
    batch = make_batch()
    attention_mask = torch.ones(4, 6, dtype=torch.bool)
    if padding:
        attention_mask[0, 3:] = False
        attention_mask[2, 5:] = False
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = tiny_model()
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        outputs[implementation] = model(**batch, attention_mask=attention_mask)
    torch.testing.assert_close(outputs["eager"].latents, outputs["sdpa"].latents)
    torch.testing.assert_close(outputs["eager"].reconstructions, outputs["sdpa"].reconstructions)


def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    model = SaneModel(SaneConfig.from_preset("tiny")).train()
    inputs = two_views(make_batch(batch_size=2, window=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    batch = make_batch()
    positions = batch["positions"].clone()
    positions[0, 0, 0] = 1024
    with pytest.raises(ValueError, match=r"global position index out of range.*1024 entries"):
        model(batch["tokens"], positions)
    positions = batch["positions"].clone()
    positions[1, 2, 2] = -1
    with pytest.raises(ValueError, match="row position index out of range"):
        model(batch["tokens"], positions)
    with pytest.raises(ValueError, match=r"\[batch, window, 289\]"):
        model(batch["tokens"][..., :288], batch["positions"])
    with pytest.raises(ValueError, match="odd"):
        model(batch["tokens"][:3], batch["positions"][:3], num_views=2)
    with pytest.raises(ValueError, match="value_mask"):
        model(**{**batch, "target_tokens": batch["tokens"], "value_mask": batch["value_mask"][:2]})


def test_activation_checkpointing_gives_the_same_gradients():
    inputs = two_views(make_batch(batch_size=2, window=4))
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            # transformers >= 5.23 names it activation_checkpointing_enable; older, gradient_...
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
            assert model.encoder.layers[0].gradient_checkpointing
        model(**inputs).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


# ----- saving and loading -----


def test_save_and_load_round_trip_with_model_card(tmp_path):
    from sane_hf.hub import save_model_card

    model = tiny_model(zoo_dataset="fake-user/cnn-zoo")
    model.save_pretrained(tmp_path)
    save_model_card(model, tmp_path, metrics={"test_mse": 0.25})
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    card = (tmp_path / "README.md").read_text()
    assert "library_name: sane-hf" in card
    assert "fake-user/cnn-zoo" in card and "value: 0.25" in card

    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is SaneModel
    batch = make_batch()
    torch.testing.assert_close(loaded(**batch).reconstructions, model(**batch).reconstructions)

    with pytest.raises(ValueError, match="zoo_dataset"):
        save_model_card(tiny_model(), tmp_path / "no-zoo", metrics={"test_mse": 0.25})


def test_encoder_and_decoder_load_their_half_of_a_full_checkpoint(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    batch = make_batch()
    full = model(**batch)

    encoder, info = SaneEncoderModel.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not keys for keys in info.values()), info
    latents = encoder.eval()(batch["tokens"], batch["positions"]).latents
    torch.testing.assert_close(latents, full.latents)

    decoder, info = SaneDecoderModel.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not keys for keys in info.values()), info
    reconstructions = decoder.eval()(latents, batch["positions"]).reconstructions
    torch.testing.assert_close(reconstructions, full.reconstructions)


def test_bf16_load(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = SaneModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    batch = make_batch()
    output = loaded(**batch, target_tokens=batch["tokens"])  # float32 tokens go in as they are
    assert output.latents.dtype == torch.bfloat16
    assert output.reconstruction_loss.dtype == torch.float32
    torch.testing.assert_close(output.latents.float(), model(**batch).latents, atol=0.05, rtol=0.05)


REMOTE_CODE_SCRIPT = """
import importlib.util, json, sys
sys.path.extend(json.loads(sys.argv[1]))
assert importlib.util.find_spec("sane_hf") is None, "sane_hf must not be importable here"
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification
model = AutoModel.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
inputs = load_file(sys.argv[3])
output = model(inputs["tokens"], inputs["positions"])
save_file({"latents": output.latents.contiguous()}, sys.argv[4])
head = AutoModelForSequenceClassification.from_pretrained(
    sys.argv[2], trust_remote_code=True, num_labels=2
)
print(type(model).__module__, type(head).__name__, head(inputs["tokens"], inputs["positions"]).predictions.shape[-1])
"""


@pytest.mark.slow
def test_remote_code_loads_without_sane_hf_installed(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    batch = make_batch()
    save_file({"tokens": batch["tokens"], "positions": batch["positions"]}, tmp_path / "in.st")

    # -I -S: no site processing, so neither the editable install's .pth nor PYTHONPATH puts
    # sane_hf on the path; the third-party site-packages are added back by hand.
    site_packages = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    paths = [str(tmp_path / name) for name in ("model", "in.st", "out.st")]
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", REMOTE_CODE_SCRIPT, json.dumps(site_packages), *paths],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, head_class, num_labels = result.stdout.split()
    assert module.startswith("transformers_modules.")
    assert (head_class, num_labels) == ("SaneForPropertyPrediction", "2")
    torch.testing.assert_close(load_file(tmp_path / "out.st")["latents"], model(**batch).latents)


def test_push_to_hub_round_trip_with_our_card(fake_hub, tmp_path):
    from huggingface_hub import ModelCard, create_repo, upload_file

    repo_id = "fake-user/sane-tiny"
    # A card written by someone else (transformers' default) must be replaced by ours.
    create_repo(repo_id)
    upload_file(
        path_or_fileobj=b"---\nlibrary_name: transformers\n---\nold card\n",
        path_in_repo="README.md",
        repo_id=repo_id,
    )
    from sane_hf.hub import push_model_to_hub

    model = tiny_model(zoo_dataset="fake-user/cnn-zoo")
    push_model_to_hub(model, repo_id, metrics={"test_mse": 0.5}, tags=["cnn-s"])

    files = fake_hub.repo_files(repo_id)
    assert {"config.json", "model.safetensors", "modeling_sane.py", "README.md"} <= set(files)
    card = ModelCard.load(repo_id)
    assert card.data.library_name == "sane-hf"
    assert "cnn-s" in card.data.tags and "sane" in card.data.tags
    assert card.data.eval_results[0].metric_value == 0.5
    assert f'from_pretrained("{repo_id}")' in card.text

    loaded = SaneModel.from_pretrained(repo_id)
    assert loaded.config.zoo_dataset == "fake-user/cnn-zoo"
    reloaded = loaded.state_dict()
    assert reloaded.keys() == model.state_dict().keys()
    for name, original in model.state_dict().items():
        assert torch.equal(reloaded[name], original), name


def test_model_card_template_ships_inside_the_package():
    from sane_hf.hub import MODEL_CARD_TEMPLATE

    assert Path(str(MODEL_CARD_TEMPLATE)).is_file()
    assert "{{ card_data }}" in MODEL_CARD_TEMPLATE.read_text()


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    """transformers would fill the missing layers at random and only print a load report."""
    import json

    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_layers"] += 1  # the folder's weights have one block fewer than its config says
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit config.json \(\d+ missing keys, first"):
        SaneModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_cpu_autocast_keeps_attention_in_float32(monkeypatch, attn_implementation):
    """Under CPU bf16 autocast the projections run in bf16 but attention gets float32 inputs:
    the CPU's bf16 attention kernels are slower than float32 ones at SANE's head sizes."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import sane_hf.models.sane.modeling_sane as modeling

    seen: list[torch.dtype] = []
    backend = (
        modeling.eager_attention_forward
        if attn_implementation == "eager"
        else ALL_ATTENTION_FUNCTIONS["sdpa"]
    )

    def recording_attention(module, query, *args, **kwargs):
        seen.append(query.dtype)
        return backend(module, query, *args, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", recording_attention)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording_attention)
    model = tiny_model()
    model.set_attn_implementation(attn_implementation)
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**batch)
    assert seen and set(seen) == {torch.float32}
    assert output.latents.dtype == torch.bfloat16  # the projection after attention is bf16
    torch.testing.assert_close(output.latents.float(), model(**batch).latents, atol=0.05, rtol=0.05)
