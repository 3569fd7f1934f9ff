"""`SaneProcessor`: everything between a network and a SANE model's inputs, saved with the model.

A pretrained SANE only understands networks prepared exactly like its training zoo: the same
architecture and token size, hidden units permuted onto the same reference network, and every
parameter standardized with the zoo's *training-split* statistics. The processor holds all of it
(`WeightLayout`, `NormalizationStats`, `PermutationSpec`, the reference network, the architecture)
and travels with the model: ``save_pretrained`` writes ``preprocessor_config.json`` and
``alignment_reference.safetensors`` into the model's folder, ``from_pretrained`` reads them from
a folder, a Hub repo or the cache (offline too)::

    model = SaneModel.from_pretrained("checkpoints/sane-cnn-mnist")
    processor = SaneProcessor.from_pretrained("checkpoints/sane-cnn-mnist")
    inputs = processor([net_a, "my_nets/", "ckpt.safetensors"])   # BatchFeature
    embeddings = sane_hf.embed(model, inputs)

Networks whose parameters differ from the zoo architecture (name, order or shape) are refused
with the first differing parameter: statistics are never matched by name alone. Deliberate
out-of-distribution use is explicit: `SaneProcessor.for_networks` fits layout and statistics on
the given networks (no alignment), as the paper does for new architectures.

``model.safetensors`` is not this module's business, and the remote-code files
(``configuration_sane.py``, ``modeling_sane.py``) do not import it: processing needs sane-hf.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoFeatureExtractor, AutoProcessor, BatchFeature
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.utils import FEATURE_EXTRACTOR_NAME, cached_file

from sane_hf.weights.alignment import PermutationSpec, align
from sane_hf.weights.layout import WeightLayout
from sane_hf.weights.normalization import NormalizationStats
from sane_hf.weights.tokenization import WeightTokenizer
from sane_hf.zoo.architectures import build_model
from sane_hf.zoo.formats import (
    ALIGNMENT_REFERENCE_FILE,
    REMOTE_PROCESSOR_FILE,
    atomic_save_safetensors,
    atomic_write_text,
    check_checkpoint_tensors,
    read_safetensors,
)
from sane_hf.zoo.metadata import ZooDataset, ZooMetadata
from sane_hf.zoo.provenance import zoo_provenance

from .configuration_sane import SaneConfig
from .network_inputs import NetworkInput, iter_networks
from .processing_universal import SaneUniversalProcessor

POSITION_NAMES = ("global", "layer", "row")


class SaneProcessor(FeatureExtractionMixin):
    """Aligns, normalizes and tokenizes networks for a SANE model; decodes tokens back.

    Args:
        tokensize: values per token (the model's ``config.tokensize``).
        layout: the `WeightLayout` of the zoo architecture (or its dict).
        normalization: per-parameter `NormalizationStats` of the zoo's training split (or dict).
        include_norm: whether normalization layers are tokenized (as in the zoo).
        architecture, architecture_kwargs: the zoo architecture (``sane_hf.build_model``); used
            to tokenize through the module's rules and to decode into modules.
        permutation_spec: the architecture's `PermutationSpec` (or dict), for alignment.
        reference: the alignment reference network (state_dict), the zoo's alignment target.
        max_positions: the model's position-table sizes; longer networks are refused.
        zoo_dataset: where the statistics come from (a Hub id or a description).
        provenance: how the zoo's networks were made (`sane_hf.zoo.provenance.zoo_provenance`:
            architecture, init and biases, data and input standardization, optimizer, epochs).
    """

    model_input_names: ClassVar[list[str]] = ["tokens", "positions", "attention_mask"]

    def __init__(
        self,
        tokensize: int,
        layout: WeightLayout | Mapping[str, Any],
        normalization: NormalizationStats | Mapping[str, Any],
        *,
        include_norm: bool = True,
        architecture: str | None = None,
        architecture_kwargs: Mapping[str, Any] | None = None,
        permutation_spec: PermutationSpec | Mapping[str, Any] | None = None,
        reference: Mapping[str, torch.Tensor] | None = None,
        alignment_reference: str | None = None,
        max_positions: Sequence[int] | None = None,
        zoo_dataset: str | None = None,
        provenance: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        for name in ("feature_extractor_type", "processor_class", "trust_remote_code", "auto_map"):
            kwargs.pop(name, None)
        unknown = sorted(name for name in kwargs if not name.startswith("_"))
        if unknown:  # a typo in preprocessor_config.json or a call must not be ignored
            raise ValueError(f"unknown SaneProcessor settings {unknown}")
        super().__init__()
        self.tokensize = int(tokensize)
        self.layout = layout if isinstance(layout, WeightLayout) else WeightLayout.from_dict(layout)
        self.normalization = (
            normalization
            if isinstance(normalization, NormalizationStats)
            else NormalizationStats.from_dict(normalization)
        )
        self.include_norm = include_norm
        self.architecture = architecture
        self.architecture_kwargs = dict(architecture_kwargs or {})
        self.permutation_spec = (
            PermutationSpec.from_dict(permutation_spec)
            if isinstance(permutation_spec, Mapping)
            else permutation_spec
        )
        self.max_positions = None if max_positions is None else [int(m) for m in max_positions]
        self.zoo_dataset = zoo_dataset
        if alignment_reference not in (None, ALIGNMENT_REFERENCE_FILE):
            # only the fixed file inside the model folder: a path would read outside it
            raise ValueError(
                f"alignment_reference must be {ALIGNMENT_REFERENCE_FILE!r} (the file beside the "
                f"config) or null, got {alignment_reference!r}"
            )
        self.provenance = None if provenance is None else dict(provenance)
        # set when the config names a reference file that from_pretrained has still to load
        self._reference_file = alignment_reference if reference is None else None
        self.reference = None
        self._check_consistent()
        if reference is not None:
            self.set_reference(reference)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_zoo_metadata(
        cls,
        metadata: ZooMetadata,
        *,
        reference: Mapping[str, torch.Tensor] | None = None,
        config: SaneConfig | None = None,
    ) -> SaneProcessor:
        """The processor of a zoo dataset (its ``sane_zoo.json``), for a model with ``config``."""
        zoo = metadata.zoo
        architecture = zoo.get("architecture")
        spec = None
        if metadata.alignment.get("aligned") and architecture is not None:
            spec = PermutationSpec.from_model(metadata.build_model())
        if config is not None and config.tokensize != metadata.tokenizer["tokensize"]:
            raise ValueError(
                f"the zoo was tokenized with tokensize {metadata.tokenizer['tokensize']}, the "
                f"model expects {config.tokensize}"
            )
        return cls(
            tokensize=metadata.tokenizer["tokensize"],
            layout=metadata.layout,
            normalization=metadata.normalization,
            include_norm=metadata.tokenizer.get("include_norm", True),
            architecture=architecture,
            architecture_kwargs=zoo.get("architecture_kwargs", {}),
            permutation_spec=spec,
            reference=reference,
            max_positions=None if config is None else config.max_positions,
            zoo_dataset=None if config is None else config.zoo_dataset,
            provenance=zoo_provenance(zoo, metadata.statistics.get("epochs")),
        )

    @classmethod
    def from_zoo(
        cls, zoo: ZooDataset | str | os.PathLike, *, config: SaneConfig | None = None
    ) -> SaneProcessor:
        """The processor of a zoo dataset, with its alignment reference taken from its rows.

        The reference (the zoo's alignment target) is a training checkpoint of the zoo; its row
        decodes back into the weights it was aligned to. A zoo whose reference checkpoint is not
        among its rows (another epoch selected) gets no reference: alignment is then off.
        """
        # here, not at the top: processing networks (predict, embed) needs no `datasets`
        from sane_hf.zoo.storage import as_splits, load_zoo_dataset

        zoo = zoo if isinstance(zoo, ZooDataset) else load_zoo_dataset(zoo)
        splits, metadata = as_splits(zoo)
        return cls.from_zoo_metadata(
            metadata, reference=_reference_row(splits, metadata), config=config
        )

    def for_networks(
        self, networks: NetworkInput | Iterable[NetworkInput], *, tokensize: int | None = None
    ) -> SaneProcessor:
        """Out-of-distribution processor: layout and statistics fitted on ``networks`` themselves.

        For networks of another architecture (or deliberately normalized on their own, e.g. to
        sample a new architecture as in the paper): the statistics come from the given networks,
        there is no alignment, and the model's position limits still apply. Embeddings of such
        networks are not comparable to those of the zoo.
        """
        named = list(iter_networks(networks))
        tokenizer = WeightTokenizer(tokensize or self.tokensize, self.include_norm)
        layout = tokenizer.layout(named[0][1])
        for network_id, state_dict in named:
            _check_layout(layout, state_dict, network_id, "the first network's")
            check_checkpoint_tensors(
                state_dict, _float_keys(layout, None), f"network {network_id!r}"
            )
        keys = [spec.key for layer in layout.layers for spec in layer.parameters]
        statistics = NormalizationStats.from_state_dicts((sd for _, sd in named), keys)
        return type(self)(
            tokensize=layout.tokensize,
            layout=layout,
            normalization=statistics,
            include_norm=self.include_norm,
            max_positions=self.max_positions,
            zoo_dataset=f"fitted on {len(named)} given networks (out of distribution)",
        )

    def set_reference(self, reference: Mapping[str, torch.Tensor]) -> None:
        """Use ``reference`` (a state_dict of the zoo architecture) as the alignment target."""
        reference = _check_layout(self.layout, reference, "alignment reference", "the processor's")
        check_checkpoint_tensors(reference, self._float_keys, "alignment reference")
        if self.permutation_spec is None:
            raise ValueError("an alignment reference needs a permutation_spec")
        self.reference = {key: value.detach().float() for key, value in reference.items()}
        self._reference_file = None

    def _check_consistent(self) -> None:
        if self.layout.tokensize != self.tokensize:
            raise ValueError(
                f"layout has tokensize {self.layout.tokensize}, processor {self.tokensize}"
            )
        keys = [spec.key for layer in self.layout.layers for spec in layer.parameters]
        self.normalization.check(keys)
        if self.permutation_spec is not None:
            self.permutation_spec.check_state_dict(
                {key: torch.empty(shape) for key, shape in self.layout.tensor_shapes()},
                "processor layout",
            )

    # -- saving and loading ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``preprocessor_config.json``: plain JSON; the reference weights go to safetensors."""
        has_reference = self.reference is not None or self._reference_file is not None
        return {
            "feature_extractor_type": type(self).__name__,
            "processor_class": type(self).__name__,
            "auto_map": {"AutoProcessor": f"{REMOTE_PROCESSOR_FILE[:-3]}.{type(self).__name__}"},
            "tokensize": self.tokensize,
            "include_norm": self.include_norm,
            "architecture": self.architecture,
            "architecture_kwargs": self.architecture_kwargs,
            "max_positions": self.max_positions,
            "zoo_dataset": self.zoo_dataset,
            "provenance": self.provenance,
            "alignment_reference": ALIGNMENT_REFERENCE_FILE if has_reference else None,
            "permutation_spec": (
                None if self.permutation_spec is None else self.permutation_spec.to_dict()
            ),
            "layout": self.layout.to_dict(),
            "normalization": self.normalization.to_dict(),
        }

    def save_pretrained(
        self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any
    ) -> list[str]:
        """Write ``preprocessor_config.json`` and ``alignment_reference.safetensors``."""
        if self.reference is None and self._reference_file is not None:
            raise ValueError(
                "this processor names an alignment reference that was never loaded: load it "
                "with SaneProcessor.from_pretrained before saving"
            )
        os.makedirs(save_directory, exist_ok=True)
        if self.reference is not None:
            atomic_save_safetensors(self.reference, Path(save_directory) / ALIGNMENT_REFERENCE_FILE)
        # What AutoProcessor runs without sane-hf installed: a pointer to `pip install sane-hf`.
        remote = Path(__file__).with_name("processing_sane_remote.py").read_text()
        atomic_write_text(Path(save_directory) / REMOTE_PROCESSOR_FILE, remote)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str = "main",
        **kwargs: Any,
    ) -> SaneProcessor | SaneUniversalProcessor:
        """Load from a folder, a Hub repo or the cache (``HF_HUB_OFFLINE=1`` works offline);
        a model of universal tokens gets its `SaneUniversalProcessor`."""
        kwargs.pop("trust_remote_code", None)
        hub = {
            "cache_dir": cache_dir,
            "force_download": force_download,
            "local_files_only": local_files_only,
            "token": token,
            "revision": revision,
        }
        try:
            settings, _ = cls.get_feature_extractor_dict(pretrained_model_name_or_path, **hub)
            if settings.get("processor_class") == SaneUniversalProcessor.__name__:
                return SaneUniversalProcessor.from_pretrained(
                    pretrained_model_name_or_path, **hub, **kwargs
                )
            processor = super().from_pretrained(pretrained_model_name_or_path, **hub, **kwargs)
        except OSError as error:
            raise OSError(
                f"{pretrained_model_name_or_path}: no SANE processor (preprocessor_config.json) "
                f"found: {str(error).splitlines()[0]}"
            ) from None
        except (ValueError, TypeError, KeyError, AttributeError) as error:  # edited or corrupt
            message = str(error.args[0] if isinstance(error, KeyError) else error).splitlines()
            raise ValueError(
                f"{pretrained_model_name_or_path}/{FEATURE_EXTRACTOR_NAME} is invalid: "
                f"{message[0] if message else type(error).__name__}"
            ) from None
        if processor._reference_file is not None:
            path = cached_file(pretrained_model_name_or_path, ALIGNMENT_REFERENCE_FILE, **hub)
            reference = read_safetensors(path, "the processor's alignment reference")
            try:
                processor.set_reference(reference)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
        return processor

    # -- processing ------------------------------------------------------------------------

    def __call__(
        self,
        networks: NetworkInput | Iterable[NetworkInput],
        *,
        align_networks: bool | None = None,
        return_raw: bool = False,
        progress: bool = False,
    ) -> BatchFeature:
        """Align, normalize and tokenize one network or many (see `network_inputs`).

        Returns a ``BatchFeature`` with ``tokens`` ``[M, N, T]`` (normalized, float32),
        ``positions`` ``[M, N, 3]`` (long), ``attention_mask`` ``[M, N]`` (bool) and
        ``network_ids`` (``M`` strings); ``raw_tokens`` too with ``return_raw=True``.

        Args:
            align_networks: permute hidden units onto the reference network, as the zoo was;
                default: whenever the processor has a reference.
            progress: a progress bar over the networks (weight matching takes a while for many).
        """
        if self._reference_file is not None and align_networks is not False:
            raise ValueError(
                f"the processor config names {self._reference_file}, which was not loaded "
                "(AutoFeatureExtractor reads the JSON only): use SaneProcessor.from_pretrained "
                "or AutoProcessor.from_pretrained, or pass align_networks=False"
            )
        if align_networks is None:
            align_networks = self.reference is not None
        if align_networks and self.reference is None:
            raise ValueError("align_networks=True needs a processor with an alignment reference")
        self.check_model_limits()
        ids, tokens = [], []
        named = tqdm(
            iter_networks(networks), desc="preparing networks", unit="network", disable=not progress
        )
        for network_id, state_dict in named:
            state_dict = _check_layout(self.layout, state_dict, network_id, "the processor's")
            check_checkpoint_tensors(state_dict, self._float_keys, f"network {network_id!r}")
            if align_networks:
                state_dict = align(
                    state_dict, self.reference, spec=self.permutation_spec
                ).state_dict
            ids.append(network_id)
            tokens.append(self._tokenize(state_dict))
        raw = torch.stack(tokens)
        count = len(ids)
        data = {
            "tokens": self.normalization.normalize_tokens(raw, self.layout).float(),
            "positions": self.layout.positions().expand(count, -1, -1).clone(),
            "attention_mask": torch.ones(count, self.layout.num_tokens, dtype=torch.bool),
            "network_ids": ids,
        }
        if return_raw:
            data["raw_tokens"] = raw
        return BatchFeature(data)

    def check_model_limits(self, max_positions: Sequence[int] | None = None) -> None:
        """Refuse a layout whose positions exceed the model's position tables."""
        limits = max_positions or self.max_positions
        if limits is None:
            return
        largest = self.layout.positions().amax(dim=0).tolist()
        for name, high, limit in zip(POSITION_NAMES, largest, limits):
            if high >= limit:
                raise ValueError(
                    f"networks of this layout need {name} positions up to {high}, but the model's "
                    f"{name} position table has {limit} entries (max_positions={list(limits)}): "
                    "embedding them needs a SANE pretrained with larger max_positions"
                )

    def _tokenize(self, state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Raw tokens ``[N, T]`` (float64) through the architecture's module rules, as the zoo."""
        module = self._module
        if module is not None:
            module.load_state_dict(state_dict)
            weights = module
        else:
            weights = state_dict
        encoded = self._tokenizer(weights)
        if encoded.layout.layers != self.layout.layers:
            raise ValueError("the network tokenizes to another layout than the processor's")
        return encoded.tokens

    @cached_property
    def _tokenizer(self) -> WeightTokenizer:
        return WeightTokenizer(self.tokensize, self.include_norm, dtype=torch.float64)

    @cached_property
    def _float_keys(self) -> list[str]:
        return _float_keys(self.layout, self._module)

    @cached_property
    def _module(self) -> nn.Module | None:
        if self.architecture is None:
            return None
        return build_model(self.architecture, **self.architecture_kwargs)

    # -- decoding --------------------------------------------------------------------------

    def decode(
        self, tokens: torch.Tensor | Mapping[str, Any] | Any, *, as_modules: bool = False
    ) -> list[dict[str, torch.Tensor]] | list[nn.Module]:
        """De-normalize and un-tokenize normalized tokens into state_dicts (or modules).

        ``tokens`` is ``[N, T]`` or ``[M, N, T]``, a ``BatchFeature`` of this processor, or a
        model output with ``reconstructions`` (``SaneModel``'s forward pass).
        """
        if isinstance(tokens, Mapping) and "tokens" in tokens:
            tokens = tokens["tokens"]
        elif getattr(tokens, "reconstructions", None) is not None:
            tokens = tokens.reconstructions
        tokens = torch.as_tensor(tokens).detach().cpu().double()
        tokens = tokens[None] if tokens.dim() == 2 else tokens
        expected = (self.layout.num_tokens, self.tokensize)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(
                f"tokens must be [N, T] or [M, N, T] with (N, T) = {expected}, got "
                f"{tuple(tokens.shape)}"
            )
        weights = self.normalization.denormalize_tokens(tokens, self.layout)
        fill = self._module if self.layout.skipped else None
        state_dicts = [
            {
                key: value.float() if value.is_floating_point() else value
                for key, value in self._tokenizer.decode(w, self.layout, fill_from=fill).items()
            }
            for w in weights
        ]
        if not as_modules:
            return state_dicts
        if self.architecture is None:
            raise ValueError("as_modules=True needs the processor's architecture")
        modules = []
        for state_dict in state_dicts:
            module = build_model(self.architecture, **self.architecture_kwargs)
            module.load_state_dict(state_dict)
            modules.append(module)
        return modules

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(architecture={self.architecture!r}, tokensize="
            f"{self.tokensize}, num_tokens={self.layout.num_tokens}, aligned="
            f"{self.reference is not None}, zoo_dataset={self.zoo_dataset!r})"
        )


def _float_keys(layout: WeightLayout, module: nn.Module | None) -> list[str]:
    """The tensors a network must hold as floating point: the module's floating-point state (not
    e.g. BatchNorm's step counter), or without an architecture every tokenized parameter. Integer
    weights are refused (`check_checkpoint_tensors`) as at import and build, never cast."""
    if module is not None:
        return [key for key, value in module.state_dict().items() if value.is_floating_point()]
    return [spec.key for layer in layout.layers for spec in layer.parameters]


def _check_layout(
    layout: WeightLayout, state_dict: Mapping[str, torch.Tensor], network_id: str, whose: str
) -> dict[str, torch.Tensor]:
    """``state_dict`` in the layout's order; refused unless its tensors are the layout's.

    Names and shapes must match exactly (files may list them in another order: safetensors
    sorts keys). The one-line message names the first differing parameter in the layout's order,
    expected vs got, so a network of another architecture is never normalized with statistics
    matched by name alone.
    """
    expected = layout.tensor_shapes()
    got = [(key, tuple(value.shape)) for key, value in state_dict.items()]
    shapes = dict(got)
    for index, (key, shape) in enumerate(expected):
        if key not in shapes:
            other = got[index] if index < len(got) else None
            found = "nothing" if other is None else f"{other[0]!r} {list(other[1])}"
            raise ValueError(
                f"network {network_id!r} does not match {whose} layout: parameter {index} "
                f"expected {key!r} {list(shape)}, got {found} ({key!r} is missing)"
            )
        if shapes[key] != shape:
            raise ValueError(
                f"network {network_id!r} does not match {whose} layout: parameter {index} "
                f"{key!r} expected shape {list(shape)}, got {list(shapes[key])}"
            )
    extra = [key for key, _ in got if key not in dict(expected)]
    if extra:
        raise ValueError(
            f"network {network_id!r} does not match {whose} layout: unexpected parameter "
            f"{extra[0]!r} {list(shapes[extra[0]])} ({len(extra)} tensors the layout lacks)"
        )
    return {key: state_dict[key] for key, _ in expected}


def _reference_row(splits: Any, metadata: ZooMetadata) -> dict[str, torch.Tensor] | None:
    """The zoo's alignment reference, decoded from its own row of the training split."""
    alignment = metadata.alignment
    if not alignment.get("aligned"):
        return None
    train = splits["train"]
    model_ids, epochs = train["model_id"], train["epoch"]
    for index, (model_id, epoch) in enumerate(zip(model_ids, epochs)):
        if model_id == alignment["reference_model_id"] and epoch == alignment["reference_epoch"]:
            tokens = train.select_columns(["tokens"]).with_format("torch")[index]["tokens"]
            return metadata.decode(tokens)
    return None


AutoFeatureExtractor.register(SaneConfig, SaneProcessor, exist_ok=True)
AutoProcessor.register(SaneConfig, SaneProcessor, exist_ok=True)


__all__ = [
    "SaneProcessor",
]
