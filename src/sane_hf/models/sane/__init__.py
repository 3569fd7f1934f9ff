"""SANE's `PreTrainedConfig` and `PreTrainedModel`s.

`configuration_sane.py` and `modeling_sane.py` are copied next to the weights for
`trust_remote_code` loading, so they import nothing from `sane_hf`. This package file is not
copied: it registers the "sane" model type with `AutoConfig` / `AutoModel` (and
`SaneForPropertyPrediction` with `AutoModelForSequenceClassification`), so that
`AutoModel.from_pretrained` resolves SANE checkpoints once any SANE class has been imported,
and `AutoProcessor` their `SaneProcessor` (``processing_sane.py``, which needs sane-hf).
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_sane import SaneConfig
from .modeling_sane import SaneForPropertyPrediction, SaneModel
from .processing_sane import SaneProcessor  # registers AutoProcessor / AutoFeatureExtractor

AutoConfig.register("sane", SaneConfig, exist_ok=True)
AutoModel.register(SaneConfig, SaneModel, exist_ok=True)
# property regression: num_labels outputs, as transformers' regression heads
AutoModelForSequenceClassification.register(SaneConfig, SaneForPropertyPrediction, exist_ok=True)

__all__ = ["SaneConfig", "SaneForPropertyPrediction", "SaneModel", "SaneProcessor"]
