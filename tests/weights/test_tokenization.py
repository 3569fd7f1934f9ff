import json
import warnings

import pytest
import torch
import transformers
from torch import nn

from sane_hf import WeightTokenizer
from sane_hf.weights.layout import WeightLayout
from sane_hf.weights.tokenization import TokenizedWeights
from sane_hf.zoo.architectures import build_model


class Mixed(nn.Module):
    """Every module type the tokenizer dispatches on, plus tensors only the generic rule knows."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, add_bias_kv=True)
        self.norm = nn.LayerNorm(8)
        self.deconv = nn.ConvTranspose2d(4, 6, 3, groups=2)
        self.group_norm = nn.GroupNorm(3, 6)
        self.batch_norm = nn.BatchNorm2d(6)
        self.instance_norm = nn.InstanceNorm2d(6, affine=True, track_running_stats=True)
        self.deconv1d = nn.ConvTranspose1d(3, 2, 2)
        self.conv3d = nn.Conv3d(2, 3, 2)
        self.deconv3d = nn.ConvTranspose3d(3, 6, 2, groups=3)
        self.scale = nn.Parameter(torch.ones(()))
        self.table = nn.Parameter(torch.zeros(2, 3, 5))
        self.register_buffer("offsets", torch.zeros(7))
        self.register_buffer("cache", torch.zeros(3), persistent=False)

    def forward(self, ids, image, signal, volume):
        x = self.embed(ids)
        x = self.norm(x + self.attention(x, x, x)[0])
        memory_keys, memory_values = torch.ones(3, 2, 5), torch.ones(3, 2, 6)
        x = x + self.cross_attention(x.transpose(0, 1), memory_keys, memory_values)[0].transpose(
            0, 1
        )
        y = self.instance_norm(self.batch_norm(self.group_norm(self.deconv(image))))
        z = (
            self.deconv1d(signal).sum()
            + self.deconv3d(self.conv3d(volume)).sum()
            + self.table.sum()
        )
        return x.sum() * self.scale + y.sum() + z + self.offsets.sum()


def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def tiny_vit():
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=8,
        patch_size=4,
    )
    return transformers.ViTModel(config)


MODELS = {
    "cnn_s": (lambda: build_model("cnn_s"), lambda: (torch.randn(2, 1, 28, 28),)),
    "cnn_m": (lambda: build_model("cnn_m"), lambda: (torch.randn(2, 3, 32, 32),)),
    "mlp": (lambda: build_model("mlp", hidden=(16, 12)), lambda: (torch.randn(2, 40),)),
    "resnet18": (
        lambda: build_model("resnet18", num_classes=100),
        lambda: (torch.randn(1, 3, 8, 8),),
    ),
    "resnet_bottleneck": (
        lambda: build_model("resnet_bottleneck"),
        lambda: (torch.randn(2, 3, 16, 16),),
    ),
    "vit": (tiny_vit, lambda: (torch.randn(2, 3, 8, 8),)),
    "gpt2": (tiny_gpt2, lambda: (torch.randint(0, 50, (2, 7)),)),
    "mixed": (
        Mixed,
        lambda: (
            torch.randint(0, 11, (2, 4)),
            torch.randn(2, 4, 5, 5),
            torch.randn(2, 3, 6),
            torch.randn(1, 2, 3, 3, 3),
        ),
    ),
}


def trained_looking(model: nn.Module, seed: int) -> nn.Module:
    """Give every float tensor random values (running variances positive), so that a round trip
    that mixed up any two values could not pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=generator))
                if key.endswith("running_var"):
                    value.abs_().add_(0.1)
            elif key.endswith("num_batches_tracked"):
                value.fill_(seed + 7)
    return model.eval()


def outputs(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        result = model(*inputs)
    return result if isinstance(result, torch.Tensor) else result[0]


@pytest.mark.parametrize("source", ["module", "state_dict"])
@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_exact(name, source):
    build, make_inputs = MODELS[name]
    torch.manual_seed(0)
    model = trained_looking(build(), seed=1)
    tokenizer = WeightTokenizer(tokensize=32)
    encoded = tokenizer(model if source == "module" else model.state_dict())

    decoded = tokenizer.decode(encoded.tokens, encoded.layout)

    original = model.state_dict()
    assert list(decoded) == list(original)
    for key, value in original.items():
        assert decoded[key].dtype == value.dtype, key
        assert torch.equal(decoded[key], value), key
    copy = trained_looking(build(), seed=2)
    copy.load_state_dict(decoded, strict=True)
    inputs = make_inputs()
    assert torch.equal(outputs(copy, inputs), outputs(model, inputs))
    real_values = sum(v.numel() for v in original.values() if v.is_floating_point())
    assert int(encoded.mask.sum()) == real_values
    assert float(encoded.tokens[~encoded.mask].abs().sum()) == 0.0


def test_reference_sequence_lengths():
    resnet = build_model("resnet18", num_classes=100)
    assert len(WeightTokenizer(tokensize=288)(resnet)) == 53_704
    assert len(WeightTokenizer(tokensize=288, include_norm=False)(resnet)) == 39_304
    cnn_m = build_model("cnn_m")
    assert sum(p.numel() for p in cnn_m.parameters()) == 10_853
    assert len(WeightTokenizer(tokensize=289)(cnn_m)) == 93
    assert len(WeightTokenizer(tokensize=289)(build_model("cnn_s"))) == 8 + 6 + 4 + 20 + 10


def test_rows_are_output_units_with_bias_appended():
    linear = nn.Linear(3, 2)
    encoded = WeightTokenizer(tokensize=3)(linear)
    expected = torch.cat([linear.weight, linear.bias[:, None]], dim=1).detach()
    # Rows of 4 values split into a full token and a token with one value.
    assert torch.equal(encoded.tokens[0::2], expected[:, :3])
    assert torch.equal(encoded.tokens[1::2, 0], expected[:, 3])
    assert encoded.mask.sum(1).tolist() == [3, 1, 3, 1]
    assert encoded.positions.tolist() == [[0, 0, 0], [1, 0, 0], [2, 0, 1], [3, 0, 1]]


def test_conv_transpose_rows_are_output_channels():
    deconv = nn.ConvTranspose2d(4, 6, 3, groups=2)  # weight [in=4, out/groups=3, 3, 3]
    encoded = WeightTokenizer(tokensize=None)(deconv)
    weight = deconv.weight.detach()
    for out in range(6):
        group, index = divmod(out, 3)
        inputs = weight[2 * group : 2 * group + 2, index]  # the 2 input channels of its group
        row = torch.cat([inputs.flatten(), deconv.bias[out : out + 1].detach()])
        assert torch.equal(encoded.tokens[out], row)
    assert encoded.layout.tokensize == 2 * 9 + 1


def test_gpt2_conv1d_rows_are_output_neurons():
    model = tiny_gpt2()
    encoded = WeightTokenizer(tokensize=33)(model)
    layout = encoded.layout
    index = layout.layer_names.index("transformer.h.0.attn.c_attn")
    layer = layout.layers[index]
    assert (layer.rows, layer.row_length) == (96, 33)
    c_attn = model.transformer.h[0].attn.c_attn
    expected = torch.cat([c_attn.weight.t(), c_attn.bias[:, None]], dim=1).detach()
    tokens = encoded.tokens[layer.token_offset : layer.token_offset + layer.num_tokens]
    assert torch.equal(tokens, expected)


def test_batchnorm_contributes_three_layers():
    norm = trained_looking(nn.BatchNorm1d(3), seed=0)
    encoded = WeightTokenizer(tokensize=4)(norm)
    layout = encoded.layout
    assert layout.layer_names == ["weight", "running_mean", "running_var"]  # a root module
    assert [layer.kind for layer in layout.layers] == ["norm", "running_mean", "running_var"]
    assert torch.equal(encoded.tokens[:3, :2], torch.stack([norm.weight, norm.bias], 1).detach())
    assert torch.equal(encoded.tokens[3:6, 0], norm.running_mean)
    assert torch.equal(encoded.tokens[6:9, 0], norm.running_var)
    assert encoded.positions[:, 1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [(kept.key, kept.values) for kept in layout.kept] == [("num_batches_tracked", (7,))]


def test_generic_rule_for_unknown_tensors():
    layout = WeightTokenizer(tokensize=8)(Mixed()).layout
    layers = {layer.name: layer for layer in layout.layers}
    assert (layers["table"].rows, layers["table"].row_length) == (2, 15)  # flatten(1)
    assert (layers["scale"].rows, layers["scale"].row_length) == (1, 1)
    assert (layers["offsets"].rows, layers["offsets"].row_length) == (1, 7)  # a vector: one row
    assert (layers["cross_attention.bias_k"].rows, layers["cross_attention.bias_k"].kind) == (
        1,
        "tensor",
    )
    assert "cache" not in layout.keys  # not persistent, so not part of the state_dict
    assert layers["attention.in_proj"].rows == 24
    assert layers["cross_attention.k_proj_weight"].row_length == 5


def test_layout_alone_gives_mask_positions_and_row_counts():
    model = build_model("cnn_m")
    encoded = WeightTokenizer(tokensize=100)(model)
    layout = encoded.layout
    assert torch.equal(layout.mask(), encoded.mask)
    assert torch.equal(layout.positions(), encoded.positions)
    assert torch.equal(layout.row_counts(), encoded.mask.sum(1))
    positions = encoded.positions
    assert torch.equal(positions[:, 0], torch.arange(len(encoded)))
    # conv2 rows hold 16*9+1 = 145 values: two tokens per row with the same layer and row index.
    second = positions[positions[:, 1] == 1]
    assert second[:, 2].tolist() == [row for row in range(32) for _ in range(2)]
    assert layout.num_layers == 5 and layout.layer_names[0] == "0"
    assert layout.row_counts()[16:18].tolist() == [100, 45]


def test_layout_is_cached_per_architecture():
    tokenizer = WeightTokenizer(tokensize=288)
    first = tokenizer.layout(build_model("resnet_bottleneck"))
    second = tokenizer.layout(build_model("resnet_bottleneck"))
    assert first.layers is second.layers
    assert (
        tokenizer.layout(build_model("resnet_bottleneck", num_classes=3)).layers is not first.layers
    )


def test_layout_json_round_trip(tmp_path):
    model = trained_looking(build_model("resnet_bottleneck"), seed=3)
    tokenizer = WeightTokenizer(tokensize=64)
    encoded = tokenizer(model)
    layout = encoded.layout
    assert WeightLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    layout.save(tmp_path / "layout.json")
    loaded = WeightLayout.load(tmp_path / "layout.json")
    assert loaded == layout
    decoded = tokenizer.decode(encoded.tokens, loaded)
    assert all(torch.equal(decoded[key], value) for key, value in model.state_dict().items())
    with pytest.raises(ValueError, match="WeightLayout"):
        WeightLayout.from_dict({"format": "something else"})
    corrupted = layout.to_dict()
    corrupted["layers"][1]["token_offset"] += 1
    with pytest.raises(ValueError, match=r"layer 'bn1' starts at token 9, expected 8"):
        WeightLayout.from_dict(corrupted)
    assert repr(layout).startswith(f"WeightLayout(num_tokens={layout.num_tokens}, tokensize=64")


@pytest.mark.parametrize("name", ["cnn_s", "cnn_m", "mlp", "resnet_bottleneck"])
def test_state_dict_and_module_give_the_same_layout(name):
    """Zoos are stored as safetensors state_dicts, sampling starts from modules: they must agree."""
    model = MODELS[name][0]()
    tokenizer = WeightTokenizer(tokensize=64)
    assert tokenizer.layout(model.state_dict()) == tokenizer.layout(model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_token_dtypes(dtype):
    model = trained_looking(build_model("cnn_s"), seed=0)
    tokenizer = WeightTokenizer(tokensize=289, dtype=dtype)
    encoded = tokenizer(model)
    assert encoded.tokens.dtype == dtype
    decoded = tokenizer.decode(encoded.tokens, encoded.layout)
    for key, value in model.state_dict().items():
        assert decoded[key].dtype == torch.float32
        if dtype == torch.float64:
            assert torch.equal(decoded[key], value)
        else:
            assert torch.equal(decoded[key], value.to(dtype).float())


def test_decode_casts_back_to_each_parameter_dtype():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).double(), nn.Linear(2, 2).half())
    tokenizer = WeightTokenizer(tokensize=5, dtype=torch.float64)
    encoded = tokenizer(model)
    decoded = tokenizer.decode(encoded.tokens, encoded.layout)
    for key, value in model.state_dict().items():
        assert decoded[key].dtype == value.dtype and torch.equal(decoded[key], value)


def test_skipping_normalization_layers():
    model = trained_looking(build_model("resnet_bottleneck"), seed=4)
    tokenizer = WeightTokenizer(tokensize=288, include_norm=False)
    encoded = tokenizer(model)
    layout = encoded.layout
    assert "bn1.weight" in layout.skipped_keys and "bn1.running_var" in layout.skipped_keys
    assert not any(".bn" in name or name == "bn1" for name in layout.layer_names)
    with pytest.warns(UserWarning, match="skipped .* normalization tensors"):
        partial = tokenizer.decode(encoded.tokens, layout)
    assert "bn1.weight" not in partial and "bn1.num_batches_tracked" in partial
    fresh = build_model("resnet_bottleneck")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = tokenizer.decode(encoded.tokens, layout, fill_from=model)
    fresh.load_state_dict(full, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_tokenized_weights_container():
    encoded = WeightTokenizer(tokensize=289)(build_model("cnn_s"))
    assert isinstance(encoded, TokenizedWeights) and len(encoded) == 48
    moved = encoded.to("cpu")
    assert torch.equal(moved.tokens, encoded.tokens) and moved.layout is encoded.layout
    assert encoded.mask.dtype == torch.bool and encoded.positions.dtype == torch.long


def test_longest_row_as_tokensize():
    encoded = WeightTokenizer(tokensize=None)(build_model("cnn_m"))
    assert encoded.layout.tokensize == 32 * 9 + 1
    assert len(encoded) == 93


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_the_parameter(bad):
    model = build_model("cnn_s")
    with torch.no_grad():
        model[4].bias[2] = bad
    with pytest.raises(ValueError, match=r"'4\.bias' contains NaN or Inf"):
        WeightTokenizer()(model)


def test_overflow_of_token_dtype_names_the_parameter():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = 1e6
    with pytest.raises(ValueError, match=r"'1\.weight' overflows the token dtype torch.float16"):
        WeightTokenizer(dtype=torch.float16)(model)


def test_decode_rejects_tokens_of_another_shape():
    tokenizer = WeightTokenizer(tokensize=289)
    encoded = tokenizer(build_model("cnn_s"))
    with pytest.raises(ValueError, match=r"shape \[93, 289\] but the layout expects \[48, 289\]"):
        tokenizer.decode(torch.zeros(93, 289), encoded.layout)
    with pytest.raises(ValueError, match=r"expects \[48, 289\]"):
        tokenizer.decode(encoded.tokens[:, :288], encoded.layout)


def test_check_compatible_reports_another_architecture():
    layout = WeightTokenizer(tokensize=289)(build_model("cnn_s")).layout
    layout.check_compatible(build_model("cnn_s"))
    with pytest.raises(
        ValueError, match=r"'0\.weight' has shape \[16, 3, 3, 3\], layout expects \[8, 1, 5, 5\]"
    ):
        layout.check_compatible(build_model("cnn_m"))
    with pytest.raises(
        ValueError, match=r"missing keys \['0\.weight'.*unexpected keys \['1\.weight'"
    ):
        layout.check_compatible(build_model("mlp"))


def test_integer_weights_are_rejected_but_integer_buffers_kept():
    state = {"fc.weight": torch.ones(2, 3, dtype=torch.int64), "fc.bias": torch.zeros(2)}
    with pytest.raises(
        ValueError, match=r"float weights expected: 'fc.weight' has dtype torch.int64"
    ):
        WeightTokenizer()(state)
    state = {"bn.weight": torch.ones(2), "bn.num_batches_tracked": torch.tensor(5)}
    layout = WeightTokenizer()(state).layout
    assert layout.kept[0].key == "bn.num_batches_tracked" and layout.kept[0].values == (5,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="nothing to tokenize"):
        WeightTokenizer()(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="outside normalization layers"):
        WeightTokenizer(include_norm=False)(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="tokensize must be a positive int"):
        WeightTokenizer(tokensize=0)
    with pytest.raises(ValueError, match="token dtype"):
        WeightTokenizer(dtype=torch.int32)
    with pytest.raises(TypeError, match=r"nn\.Module or a state_dict"):
        WeightTokenizer()([torch.ones(2)])


def test_gradients_and_empty_tensors():
    state = {
        "fc.weight": nn.Parameter(torch.randn(3, 2)),
        "fc.bias": nn.Parameter(torch.randn(3)),
        "unused.weight": torch.empty(0, 4),
    }
    tokenizer = WeightTokenizer(tokensize=8)
    encoded = tokenizer(state)
    assert not encoded.tokens.requires_grad and len(encoded) == 3
    assert encoded.layout.kept[0].key == "unused.weight"  # nothing to tokenize, kept by shape
    decoded = tokenizer.decode(encoded.tokens.requires_grad_(), encoded.layout)
    assert not decoded["fc.weight"].requires_grad
    assert torch.equal(decoded["fc.weight"], state["fc.weight"].detach())
    assert decoded["unused.weight"].shape == (0, 4)


def test_layout_of_a_model_without_weights():
    """Sampling for a new architecture only needs its layout: a meta-device model will do,
    unless it has non-float buffers, whose values the layout must store."""
    tokenizer = WeightTokenizer(tokensize=289)
    with torch.device("meta"):
        cnn, resnet = build_model("cnn_m"), build_model("resnet_bottleneck")
    assert tokenizer.layout(cnn) == tokenizer.layout(build_model("cnn_m"))
    with pytest.raises(ValueError, match=r"'bn1\.num_batches_tracked' is on the meta device"):
        tokenizer.layout(resnet)
