"""A Titans language model behind transformers' ``AutoModelForCausalLM`` (``generate()``, lm-eval's ``hf``).

``TitansForCausalLM`` holds a ``TitansLM`` as ``model`` and runs it unchanged. Between ``generate()`` steps
it carries the model's ``ModelState`` (memories, convolution and attention caches) under the name ``state``,
one of the cache names transformers knows: every step feeds only the tokens the state has not read yet.
The memories write every token they read, so padding inside a sequence is refused rather than read: batch
prompts of equal length (or right-pad when scoring: a causal model's scores do not see what follows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from titans_scale.hf.configuration_titans import TitansConfig
from titans_scale.models.model import ModelState, TitansLM, token_cross_entropy


@dataclass
class TitansCausalLMOutput(ModelOutput):
    """Logits (B, N, V), the loss when labels were given, and the state after the last token."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    state: ModelState | None = None


class TitansPreTrainedModel(PreTrainedModel):
    config_class = TitansConfig
    base_model_prefix = "model"
    _is_stateful = True  # no beam reordering or assisted decoding: the state cannot be rewound
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        if isinstance(module, TitansLM):
            module.reset_parameters()


class TitansForCausalLM(TitansPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["model.head.weight"]

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.model = TitansLM(config.model_config())
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.head

    def set_output_embeddings(self, value):
        self.model.head = value

    def forward(self, input_ids: torch.LongTensor, state: ModelState | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, **unused) -> TitansCausalLMOutput:
        """``labels`` as transformers' causal LMs take them: the loss of predicting ``labels[:, 1:]``
        (-100 ignored) from each position before it."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("Titans reads every token into its memory, so it cannot skip padding: give sequences "
                             "of equal length (batch_size=1 in lm-eval's generation), or right-pad when scoring")
        logits, state = self.model(input_ids, state)
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            keep = targets != -100
            losses = token_cross_entropy(logits[:, :-1], targets.clamp(min=0))
            loss = (losses * keep).sum() / keep.sum().clamp(min=1)
        output = TitansCausalLMOutput(loss=loss, logits=logits, state=state if use_cache is not False else None)
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, state: ModelState | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                                      **unused) -> dict:
        """The prompt at the first step, then only the tokens after ``state.position``."""
        if state is not None:
            return {"input_ids": input_ids[:, state.position :], "state": state, "use_cache": use_cache}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}

    def generate(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("num_beams", config.num_beams) > 1:
            raise ValueError("Titans generates with num_beams=1 only (its memory state cannot be reordered)")
        return super().generate(*args, **kwargs)
