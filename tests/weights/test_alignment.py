import copy
import json

import pytest
import torch
from torch import nn

from sane_hf import build_model
from sane_hf.weights.alignment import (
    PermutationSpec,
    PermutedAxis,
    align,
    apply_permutation,
    invert_permutation,
    random_permutation,
)


def _cnn_without_bn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 7),
        nn.GELU(),
        nn.Linear(7, 3),
    )


def _cnn_with_bn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
    )


def _mlp_with_bn():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(10, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3)
    )


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=8, vocab_size=20)
    config.bos_token_id = config.eos_token_id = None
    return GPT2Model(config)


def _vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
    )
    return ViTModel(config, add_pooling_layer=False)


# (factory, example input, expected number of permutation groups)
ARCHITECTURES = {
    "cnn_s_gray": (lambda: build_model("cnn_s", in_channels=1), torch.randn(2, 1, 28, 28), 4),
    "cnn_s_rgb": (lambda: build_model("cnn_s", in_channels=3), torch.randn(2, 3, 28, 28), 4),
    "cnn_m": (lambda: build_model("cnn_m"), torch.randn(2, 3, 32, 32), 4),
    "mlp": (lambda: build_model("mlp", activation="tanh"), torch.randn(2, 40), 2),
    # stem+layer1 residual stream, one per later stage (3), and every block's inner conv (8)
    "resnet18": (lambda: build_model("resnet18"), torch.randn(2, 3, 8, 8), 12),
    # stem, one residual stream per stage (4), two inner convs per block (8)
    "resnet_bottleneck": (lambda: build_model("resnet_bottleneck"), torch.randn(2, 3, 8, 8), 13),
    "cnn_without_bn": (_cnn_without_bn, torch.randn(2, 3, 8, 8), 3),
    "cnn_with_bn": (_cnn_with_bn, torch.randn(2, 3, 8, 8), 2),
    "mlp_with_bn": (_mlp_with_bn, torch.randn(4, 10), 1),
    # one MLP hidden dimension per transformer layer; residual stream and attention stay fixed
    "gpt2": (_gpt2, {"input_ids": torch.randint(0, 20, (2, 8))}, 2),
    "vit": (_vit, {"pixel_values": torch.randn(2, 3, 8, 8)}, 2),
}


def _build(name):
    factory, inputs, num_groups = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = factory().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.weight.normal_(generator=generator)
                module.bias.normal_(generator=generator)
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
            elif getattr(module, "bias", None) is not None:
                module.bias.normal_(0.0, 0.1, generator=generator)  # HF inits biases to zero
    return model, inputs, num_groups


@torch.no_grad()
def _forward(model, inputs):
    output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(output, "last_hidden_state", output)


def _load(model, state_dict):
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(state_dict)
    return permuted


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_random_permutation_preserves_function(name):
    model, inputs, num_groups = _build(name)
    spec = PermutationSpec.from_model(model)
    assert len(spec.groups) == num_groups

    perms = random_permutation(spec, torch.Generator().manual_seed(2))
    state = model.state_dict()
    permuted = apply_permutation(state, spec, perms)

    torch.testing.assert_close(
        _forward(_load(model, permuted), inputs), _forward(model, inputs), atol=1e-5, rtol=0
    )
    for group, members in spec.group_axes.items():  # every group really moves its tensors
        assert any(not torch.equal(permuted[key], state[key]) for key, _, _ in members), group


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_align_recovers_permuted_copy(name):
    model, _, _ = _build(name)
    spec = PermutationSpec.from_model(model)
    perms = random_permutation(spec, torch.Generator().manual_seed(3))
    permuted = apply_permutation(model.state_dict(), spec, perms)

    result = align(permuted, model, spec=spec)

    assert result.converged
    assert result.distance_before > 0 and result.distance_after == 0
    for key, tensor in model.state_dict().items():
        assert torch.equal(result.state_dict[key], tensor), key
    for group, perm in invert_permutation(perms).items():
        assert torch.equal(result.permutations[group], perm), group


def test_spec_of_cnn_s_ties_flatten_blocks_and_fixes_network_boundary():
    spec = PermutationSpec.from_model(build_model("cnn_s", in_channels=1))
    assert spec.groups == {"0": 8, "4": 6, "8": 4, "12": 20}
    assert spec.axes["0.weight"] == (PermutedAxis("0"), None, None, None)  # input channels fixed
    assert spec.axes["4.weight"] == (PermutedAxis("4"), PermutedAxis("0"), None, None)
    # the last conv's 4 channels of 3x3 pixels are flattened: blocks of 9 features move together
    assert spec.axes["12.weight"] == (PermutedAxis("12"), PermutedAxis("8", 9))
    assert spec.axes["15.weight"] == (None, PermutedAxis("12"))  # class logits fixed
    assert spec.axes["15.bias"] == (None,)


def test_spec_of_resnet18_joins_residual_stream_and_batch_norm():
    model = build_model("resnet18")
    spec = PermutationSpec.from_model(model)
    stream = PermutedAxis("conv1")
    for key in ("bn1.weight", "bn1.running_var", "layer1.0.bn2.bias", "layer1.1.bn2.running_mean"):
        assert spec.axes[key] == (stream,), key
    assert spec.axes["layer2.0.conv1.weight"][1] == stream
    assert spec.axes["layer2.0.downsample.1.weight"] == spec.axes["layer2.1.bn2.weight"]
    assert spec.axes["fc.weight"] == (None, PermutedAxis("layer4.0.conv2"))
    assert spec.axes["bn1.num_batches_tracked"] == ()
    assert spec.axes["conv1.weight"][1] is None
    assert {"bn1.running_mean", "bn1.running_var"} <= spec.buffers
    assert "bn1.weight" not in spec.buffers


def test_spec_json_round_trip():
    spec = PermutationSpec.from_model(build_model("resnet_bottleneck"))
    assert PermutationSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_batched_permutations_match_single_ones():
    model, _, _ = _build("cnn_with_bn")
    spec = PermutationSpec.from_model(model)
    perms = random_permutation(spec, torch.Generator().manual_seed(4), num=3)
    batched = apply_permutation(model.state_dict(), spec, perms)
    for i in range(3):
        single = apply_permutation(model.state_dict(), spec, {g: p[i] for g, p in perms.items()})
        for key, tensor in single.items():
            assert torch.equal(batched[key][i], tensor), key


def test_flat_index_maps_permute_flattened_weights():
    model, _, _ = _build("cnn_s_gray")
    spec = PermutationSpec.from_model(model)
    state = model.state_dict()
    perms = random_permutation(spec, torch.Generator().manual_seed(6), num=2)
    positions = {key: torch.arange(t.numel()).view(t.shape) for key, t in state.items()}
    index = apply_permutation(positions, spec, perms)  # [2, *shape] flat gather indices
    permuted = apply_permutation(state, spec, perms)
    for key, tensor in state.items():
        gathered = tensor.flatten()[index[key].flatten(1)]
        assert torch.equal(gathered, permuted[key].flatten(1)), key


def _train_mlp(seed, features, labels):
    torch.manual_seed(seed)
    model = build_model("mlp", in_features=features.shape[1], hidden=(32, 32), activation="relu")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
    return model.eval()


def test_align_brings_independently_trained_models_closer():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(256, 20, generator=generator)
    labels = (features @ torch.randn(20, 5, generator=generator)).argmax(dim=1)  # a teacher task
    reference = _train_mlp(0, features, labels)
    model = _train_mlp(1, features, labels)

    result = align(model, reference)

    assert result.distance_after < 0.9 * result.distance_before
    aligned = _load(model, result.state_dict)
    torch.testing.assert_close(aligned(features), model(features), atol=1e-5, rtol=0)


def test_user_spec_overrides_derived_one():
    model, _, _ = _build("mlp")
    derived = PermutationSpec.from_model(model)
    only_first = PermutationSpec(
        groups={"hidden1": 100},
        axes={
            key: tuple(PermutedAxis("hidden1") if e and e.group == "1" else None for e in entries)
            for key, entries in derived.axes.items()
        },
    )
    perms = random_permutation(derived, torch.Generator().manual_seed(5))
    permuted = apply_permutation(model.state_dict(), derived, perms)

    result = align(permuted, model.state_dict(), spec=only_first)

    assert set(result.permutations) == {"hidden1"}
    assert torch.equal(result.state_dict["1.weight"], model.state_dict()["1.weight"])
    assert torch.equal(result.state_dict["7.weight"], permuted["7.weight"])  # untouched group


def test_align_needs_a_module_or_a_spec():
    state = build_model("mlp").state_dict()
    with pytest.raises(ValueError, match=r"spec=PermutationSpec\.from_model"):
        align(state, state)


class _ViewFlatten(nn.Module):
    """``view`` instead of ``Flatten``: the propagation cannot follow it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc2(torch.tanh(self.fc1(x.view(x.size(0), -1))))


class _ChannelSlice(nn.Module):
    """Indexes and concatenates hidden channels, and reuses a weight outside its layer."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 7)
        self.head = nn.Linear(7 + 2, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.fc2(h)) + h[:, :1]
        y = torch.relu(self.fc3(h))
        return self.head(torch.cat([y, x[:, :2] @ self.fc1.weight[:2, :2]], dim=1))


class _DataDependent(nn.Module):
    """Untraceable as a whole (control flow on values): each child is traced on its own."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 5))
        self.attention = nn.MultiheadAttention(5, 1, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = self.block(x)
        if h.sum() > 0:
            h = -h
        h, _ = self.attention(h, h, h)
        return self.head(h)


class _TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize(
    ("module", "inputs", "groups"),
    [
        (_ViewFlatten(), torch.randn(3, 3, 6, 6), {"fc1": 6}),
        (_ChannelSlice(), torch.randn(3, 5), {}),
        (_DataDependent(), torch.randn(3, 4, 5), {"block.0": 8}),
        (_TiedWeights(), torch.randn(3, 4), {}),
    ],
    ids=["view", "slice_cat_weight_reuse", "untraceable", "tied"],
)
def test_unknown_operations_fix_groups_instead_of_guessing(module, inputs, groups):
    torch.manual_seed(0)
    module.eval()
    spec = PermutationSpec.from_model(module)
    assert spec.groups == groups
    permuted = apply_permutation(module.state_dict(), spec, random_permutation(spec))
    torch.testing.assert_close(
        _forward(_load(module, permuted), inputs), _forward(module, inputs), atol=1e-5, rtol=0
    )


def test_bad_inputs_are_reported():
    spec = PermutationSpec.from_model(build_model("mlp"))
    state = build_model("mlp").state_dict()
    with pytest.raises(ValueError, match="missing"):
        apply_permutation(state, spec, {"1": torch.arange(100)})
    with pytest.raises(ValueError, match=r"group '1'"):
        apply_permutation(state, spec, {"1": torch.arange(99), "4": torch.arange(100)})
    with pytest.raises(ValueError, match="missing keys"):
        apply_permutation(
            {k: v for k, v in state.items() if k != "1.bias"}, spec, random_permutation(spec)
        )
    with pytest.raises(ValueError, match=r"'4.weight'.* needs 100"):
        spec.check_state_dict(build_model("mlp", hidden=(100, 99)).state_dict())
    with pytest.raises(ValueError, match="not in groups"):
        PermutationSpec(groups={}, axes={"w": (PermutedAxis("nope"),)})
