"""Permutation symmetries of networks: derive them, sample them, apply them, align networks.

Hidden units of a network can be reordered without changing the function it computes: permute
the output channels of a layer and the input channels of every layer reading them, and the
network is the same function. SANE uses this twice: every model of a zoo is mapped to a
canonical ordering by *weight matching* against a reference model (Git Re-Basin, Ainsworth et
al. 2023), which halves the reconstruction loss, and random function-preserving permutations
are a training augmentation.

Everything here rests on a :class:`PermutationSpec`, which says which axis of which
``state_dict`` tensor moves with which *permutation group* (a set of channels that must be
reordered together). :meth:`PermutationSpec.from_model` derives it from the network itself by
tracing it with ``torch.fx`` and propagating channel groups through the graph; residual
additions join groups (union-find), BatchNorm parameters and buffers follow their convolution,
a ``Flatten`` between a convolution and a linear layer makes each channel a block of ``H*W``
input features, and the network's own inputs and outputs are never permuted. Anything the
propagation does not understand (a ``view``, indexing, concatenation, an unknown layer, a
parameter used outside its layer) makes the channel groups it touches *fixed*: a spec may miss
a symmetry, it must never claim a wrong one. Modules that cannot be traced as a whole (most
Hugging Face models) are split into their largest traceable submodules, whose inputs and
outputs are then fixed; this still finds the hidden dimension of transformer MLP blocks
(GPT-2's ``c_fc``/``c_proj``, ViT's ``fc1``/``fc2``).

Assumptions of the derivation: convolution and BatchNorm inputs carry a batch dimension (how
``nn.Module`` layers are called in a zoo); a parameter of a traced module is not used by code
outside it (shared parameters are detected and joined); and a submodule traced on its own
because its parent could not be traced is used through its ``forward``.
"""

from sane_hf.weights.alignment.matching import AlignmentResult, align
from sane_hf.weights.alignment.spec import (
    PermutationSpec,
    PermutedAxis,
    StateDict,
    apply_permutation,
    axis_permutation_index,
    invert_permutation,
    random_permutation,
)

__all__ = [
    "AlignmentResult",
    "PermutationSpec",
    "PermutedAxis",
    "StateDict",
    "align",
    "apply_permutation",
    "axis_permutation_index",
    "invert_permutation",
    "random_permutation",
]
