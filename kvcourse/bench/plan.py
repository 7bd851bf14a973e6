"""The plan of a benchmark run: which models, which prompts, how many tokens, how many rounds.

Models: the bundled model (``load_model()``, trained) and random-weight models of the published
SmolLM2-135M and SmolLM2-1.7B shapes (``kvcourse.shapes.random_model``; 1.7B by default on a GPU only,
``--big`` on the CPU). Their linear weights are redrawn at std 1/sqrt(fan_in): with ``random_model``'s
std 0.02 init a random model repeats one token forever, and a token check could not see, for example,
a position bug. Prompts are token ids of the bundled tokenizer for every model (they are inside every
vocabulary): "The red cat was", and a fixed Shakespeare passage cut to ``--long-prompt-tokens``.

``Plan`` holds every setting of one run; ``kvcourse.bench.cli.make_plan`` builds it from the command line
(and its presets: full, ``--quick``, ``--gpu-quick``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SHORT_PROMPT = "The red cat was"
# Public domain (Hamlet III.i and Sonnet 18); repeated as needed, then cut to the asked number of tokens.
LONG_TEXT = """\
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;
For who would bear the whips and scorns of time,
The oppressor's wrong, the proud man's contumely,
The pangs of despised love, the law's delay,
The insolence of office and the spurns
That patient merit of the unworthy takes,
When he himself might his quietus make
With a bare bodkin? who would fardels bear,
To grunt and sweat under a weary life,
But that the dread of something after death,
The undiscover'd country from whose bourn
No traveller returns, puzzles the will
And makes us rather bear those ills we have
Than fly to others that we know not of?
Thus conscience does make cowards of us all;
And thus the native hue of resolution
Is sicklied o'er with the pale cast of thought,
And enterprises of great pith and moment
With this regard their currents turn awry,
And lose the name of action.
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


@dataclass
class Model:
    """A model under test; ``hf`` is a ``transformers`` ``LlamaForCausalLM``."""

    name: str
    hf: object
    note: str
    big: bool = False


def random_llama(shape: str, layers: int | None, *, seed: int = 0, device: torch.device | str = "cpu"):
    """``random_model`` of a published shape, linear weights redrawn at std 1/sqrt(fan_in) (seeded).

    LeCun-style init keeps every layer's output at unit scale, so greedy output varies from token to
    token (with the 0.02 default a random model echoes one token), and a wrong position, mask or cache
    changes the tokens. Shapes, and so every timing, are those of the published model.
    """
    from ..shapes import random_model

    model = random_model(shape, device=device, num_hidden_layers=layers, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(p.shape[1])))
    return model


def parse_model_spec(spec: str) -> tuple[str, int | None]:
    """``"bundled"``, ``"SmolLM2-135M"`` or ``"SmolLM2-135M:4"`` (4 layers) -> (name, layers)."""
    name, _, layers = spec.partition(":")
    if layers:
        if not layers.isdigit() or int(layers) < 1:
            raise ValueError(f"bad model spec {spec!r}: expected NAME or NAME:LAYERS with LAYERS >= 1")
        return name, int(layers)
    return name, None


def check_model_specs(specs: list[str]) -> None:
    """Refuse, as a command-line error naming ``--models``, a spec that is no bundled model or known shape."""
    from ..models import BUNDLED_NAMES
    from ..shapes import get_shape

    for spec in specs:
        try:
            model, layers = parse_model_spec(spec)
            if model in BUNDLED_NAMES and layers is not None:
                raise ValueError(f"the bundled model has a fixed depth: use 'bundled', not {spec!r}")
            if model not in BUNDLED_NAMES:
                get_shape(model)
        except (ValueError, KeyError) as err:
            raise SystemExit(f"--models: {err.args[0]}") from err


def load_models(specs: list[str], device: torch.device, seed: int) -> Iterator[Model]:
    """Yield a Model for each spec, one at a time (so a big model can be freed before the next loads)."""
    from ..models import BUNDLED_NAMES, load_model
    from ..shapes import get_shape

    for spec in specs:
        name, layers = parse_model_spec(spec)
        if name in BUNDLED_NAMES:
            if layers is not None:
                raise ValueError(f"the bundled model has a fixed depth; use 'bundled', not {spec!r}")
            hf, _ = load_model(device=device)
            yield Model("bundled", hf, f"trained, kvcourse/bard, {hf.config.num_hidden_layers} layers")
        else:
            shape = get_shape(name)  # KeyError naming the known shapes
            hf = random_llama(shape.name, layers, seed=seed, device=device)
            depth = layers or shape.num_hidden_layers
            label = shape.name if layers is None else f"{shape.name} ({layers} layers)"
            yield Model(label, hf, f"random weights, published shape, {depth} layers", big="1.7B" in shape.name)


def bundled_tokenizer():
    """The bundled model's tokenizer (offline): it gives the prompt ids for every model."""
    from transformers import AutoTokenizer

    from ..models import resolve_name

    return AutoTokenizer.from_pretrained(resolve_name(None), local_files_only=True)


def prompt_ids(tokenizer, kind: str, long_tokens: int) -> torch.Tensor:
    """(1, T) token ids: the short prompt, or the long text repeated and cut to ``long_tokens``."""
    if kind == "short":
        return tokenizer(SHORT_PROMPT, return_tensors="pt").input_ids
    ids = tokenizer(LONG_TEXT, return_tensors="pt").input_ids
    reps = -(-long_tokens // ids.shape[1])
    return ids.repeat(1, reps)[:, :long_tokens]


@dataclass
class Plan:
    """What one run does (see ``kvcourse.bench.cli.parse_args`` for the meaning of each field)."""

    models: list[str]
    prompts: list[str]
    methods: list[str]
    new_tokens: int
    long_new_tokens: int
    big_new_tokens: int
    long_prompt_tokens: int
    repeats: int
    threads: int
    device: torch.device
    dtype: torch.dtype
    bandwidth_mib: int
    cache_lengths: list[int]
    profile: bool
    separate_check: bool
    compile: bool
    seed: int
    quick: bool
    preset: str = "full"  # "full", "quick" or "gpu-quick"
    batch_sweep: str | None = None  # the method whose decode is timed at batch 1, 2, 4, ... (None: no sweep)
    batch_sizes: tuple[int, ...] = ()

    def profiles(self, prompt: str) -> bool:
        """Whether this prompt's per-step times are kept (the first prompt only: they are for the plot)."""
        return self.profile and prompt == self.prompts[0]

    def n_new(self, model: Model, prompt: str) -> int:
        """New tokens per call for this model and prompt."""
        if model.big:
            return self.big_new_tokens
        return self.new_tokens if prompt == "short" else self.long_new_tokens


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``max_batch``, and ``max_batch`` itself when it is not a power of two."""
    sizes, b = [], 1
    while b <= max_batch:
        sizes.append(b)
        b *= 2
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return tuple(sizes)
