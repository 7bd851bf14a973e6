"""Published model shapes, and random-weight models built from them (no download).

Timing and memory work needs a model of a real shape, not its trained weights: a randomly
initialised ``LlamaForCausalLM`` with the same config does the same arithmetic and holds the
same cache. Shapes are from each model's published ``config.json`` on the Hugging Face hub:

- SmolLM2-135M: https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json
- SmolLM2-1.7B: https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json
- Llama-3-8B:   https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
- Llama-3-70B:  https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """The numbers of a Llama-family config that set compute and KV-cache size."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        """Refuse a shape no model can have: counts that are not positive ints, heads that do not split evenly."""
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Shape {self.name!r}: {f} must be an int >= 1, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"Shape {self.name!r}: hidden_size {self.hidden_size} must be a multiple of "
                             f"num_attention_heads {self.num_attention_heads} (head_dim = hidden_size / heads)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Shape {self.name!r}: num_attention_heads {self.num_attention_heads} must be a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads} (each KV head serves a group)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def config(self, **overrides):
        """A ``transformers.LlamaConfig`` of this shape."""
        from transformers import LlamaConfig

        kw = asdict(self)
        kw.pop("name")
        known = LlamaConfig()
        unknown = sorted(k for k in overrides if k not in kw and not hasattr(known, k))
        if unknown:  # LlamaConfig would keep a misspelt field as a stray attribute, silently unused
            raise TypeError(f"{', '.join(unknown)} is not a LlamaConfig field; this shape's fields are "
                            f"{', '.join(kw)}")
        kw.update(overrides)
        return LlamaConfig(**kw)


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, 8192, 100000.0, True),
        Shape("SmolLM2-1.7B", 49152, 2048, 8192, 24, 32, 32, 8192, 130000.0, True),
        Shape("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, 8192, 500000.0, False),
        Shape("Llama-3-70B", 128256, 8192, 28672, 80, 64, 8, 8192, 500000.0, False),
    )
}


def get_shape(name: str) -> Shape:
    """Look a shape up by name (case-insensitive), with a clear error for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"get_shape takes a shape name (one of {', '.join(SHAPES)}), got {type(name).__name__} "
                        f"{name!r}")
    for key, shape in SHAPES.items():
        if key.lower() == name.lower():
            return shape
    raise KeyError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")


def random_model(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 num_hidden_layers: int | None = None, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` with a published shape, in eval mode.

    ``num_hidden_layers`` overrides the depth (the cache per layer is unchanged), which keeps
    tests fast on a laptop CPU. Weights are seeded, so two calls give the same model.
    """
    from transformers import LlamaForCausalLM

    shape = get_shape(name)
    if num_hidden_layers is not None and (isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int)
                                          or num_hidden_layers < 1):
        raise ValueError(f"num_hidden_layers must be None (the shape's {shape.num_hidden_layers}) or an int >= 1, "
                         f"got {num_hidden_layers!r}")
    overrides = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    config = shape.config(**overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype).eval()
