"""How `mpr train` embeds a batch within a memory budget.

Training keeps, for the backward pass, the activations of every text embedded with gradient: on CPU about
40 MB for one 256-token text of all-MiniLM-L6-v2 with the fused attention kernel, and about 100 MB when
attention dropout makes PyTorch build the full attention matrices. A default batch (32 queries with 8
passages each) is 288 texts, far past a laptop's memory, so the planner measures the activation bytes of
the model at hand and picks, in this order:

1. the whole batch in one pass, when it fits;
2. GradCache chunks (:class:`train.losses.gradcache.ChunkPlan`) of length-sorted texts, as many as the budget
   holds at each chunk's longest text;
3. the same with gradient checkpointing, only when not even one text of the maximum length fits without it.

The measurement runs the model forward on dummy texts inside ``torch.autograd.graph.saved_tensors_hooks``
and adds up the distinct storages autograd keeps: exact for the model and the attention path it really
takes, with no table of model sizes.
"""

from __future__ import annotations

import ctypes
import math
import resource
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from pipeline.errors import MprError

if TYPE_CHECKING:
    from transformers import PreTrainedModel
from train.config import CPU_MEMORY_BUDGET, GPU_MEMORY_SHARE, parse_size
from train.losses.gradcache import ChunkPlan

#: Activation memory held during a chunk's backward pass, relative to what its forward pass saved (the
#: gradients of the activations live beside them for a while).
BACKWARD_FACTOR = 1.3
#: What the trainer allocates besides the model, its gradients and AdamW's two moments (data loader, score
#: matrices, allocator slack), on top of the memory measured before training starts.
RESERVE_BYTES = 300 * 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
#: Texts of the maximum length a chunk holds at least under the default budget: when the process already
#: holds more than the default budget leaves room for, the default grows to fit this many.
MIN_DEFAULT_CHUNK = 4


def format_size(num_bytes: float) -> str:
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.2f} GB"
    return f"{num_bytes / 2**20:.0f} MB"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def limit_heap_fragmentation(limit: bool = True) -> bool:
    """On glibc, with ``limit``, serve allocations of 1 MB and more with mmap, so memory freed between
    GradCache chunks goes back to the system instead of fragmenting the heap (which otherwise grows the
    resident memory step after step). Every such allocation then costs fresh zeroed pages, which slows a
    whole-batch step (bench/README.md has the figures), so it is for runs the budget binds (GradCache
    chunks); without ``limit`` the threshold is glibc's largest (32 MB), as its own adjustment reaches, also
    after an earlier limited run in the process. Whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, (1 if limit else 32) << 20))
    except (OSError, AttributeError):  # not glibc
        return False


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux
        return peak_rss_bytes()


# ---------------------------------------------------------------------------------------------------------
# The model's attention
# ---------------------------------------------------------------------------------------------------------


def transformer_of(model: nn.Module) -> PreTrainedModel | None:
    """The Hugging Face model inside a SentenceTransformer (its first module's ``auto_model``)."""
    first = next(iter(model.children()), None) if isinstance(model, nn.Sequential) else None
    auto = getattr(first, "auto_model", None)
    # a PreTrainedModel, or a custom module that quacks like one
    return cast("PreTrainedModel", auto) if isinstance(auto, nn.Module) else None


def use_sdpa(model: nn.Module) -> str:
    """Switch the model to PyTorch's scaled-dot-product attention where it supports it; the attention
    implementation in use."""
    auto = transformer_of(model)
    config = getattr(auto, "config", None)
    current = str(getattr(config, "_attn_implementation", "unknown"))
    if current == "eager" and auto is not None and hasattr(auto, "set_attn_implementation"):
        try:
            auto.set_attn_implementation("sdpa")
            current = "sdpa"
        except (ValueError, ImportError):  # the architecture has no SDPA path
            pass
    return current


def set_attention_dropout(model: nn.Module, probability: float) -> int:
    """Set the dropout on attention probabilities (the ``nn.Dropout`` children of attention modules);
    the number of modules changed. 0 lets PyTorch's fused attention kernel run in training on CPU."""
    changed = 0
    for module in model.modules():
        if "Attention" not in type(module).__name__:
            continue
        for child in module.children():
            if isinstance(child, nn.Dropout):
                child.p = probability
                changed += 1
    return changed


def attention_dropout(model: nn.Module) -> float | None:
    for module in model.modules():
        if "Attention" in type(module).__name__:
            for child in module.children():
                if isinstance(child, nn.Dropout):
                    return float(child.p)
    return None


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------


def _dummy_features(model: Any, texts: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    features = tokenize(["a " * length] * texts)
    features = {
        k: v[:, :length] if isinstance(v, torch.Tensor) and v.ndim == 2 else v for k, v in features.items()
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def saved_bytes(model: Any, texts: int, length: int, autocast: torch.dtype | None = None) -> int:
    """Bytes of the distinct tensors autograd saves for one forward pass of ``texts`` texts of ``length``
    tokens, in training mode."""
    device = next(model.parameters()).device
    features = _dummy_features(model, texts, length, device)
    storages: dict[tuple[int, str], int] = {}
    held: list[
        torch.Tensor
    ] = []  # alive until the measurement ends, so that no two storages share an address

    def pack(tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), str(tensor.device))] = storage.nbytes()
        held.append(tensor)
        # Its index, not the tensor itself: the graph would then hold its own outputs, a cycle Python's
        # collector cannot see, which kept the model alive after training. There is no backward pass to
        # unpack for.
        return len(held) - 1

    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, held.__getitem__):
            if autocast is not None:
                with torch.autocast(device.type, dtype=autocast):
                    model(features)
            else:
                model(features)
    finally:
        model.train(was_training)
        held.clear()
    return sum(storages.values())


def per_text_bytes(model: Any, length: int, autocast: torch.dtype | None = None) -> float:
    """Activation bytes one text of ``length`` tokens adds (measured as 2 texts minus 1 text, so the
    weights autograd also saves cancel out)."""
    return float(max(saved_bytes(model, 2, length, autocast) - saved_bytes(model, 1, length, autocast), 1))


def cost_model(model: Any, max_length: int, autocast: torch.dtype | None = None) -> tuple[float, float]:
    """(a, b) of cost(L) = a·L + b·L², fitted through measurements at L = max_length and max_length / 2."""
    long_ = max_length
    short = max(2, max_length // 2)
    c_long, c_short = per_text_bytes(model, long_, autocast), per_text_bytes(model, short, autocast)
    if long_ == short:
        return c_long / long_, 0.0
    b = max(0.0, (c_long / long_ - c_short / short) / (long_ - short))
    a = max(0.0, c_long / long_ - b * long_)
    return a, b


# ---------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EmbeddingPlan:
    """What the planner chose and the figures it chose from."""

    chunk_plan: ChunkPlan | None
    gradient_checkpointing: bool
    attention: str
    attention_dropout: float | None
    budget: int
    fixed: int
    text_bytes: float
    texts_per_chunk: int
    texts_per_batch: int
    max_length: int
    device: str
    source: str

    def describe(self) -> str:
        """One line: what was chosen and why."""
        dropout = "" if self.attention_dropout is None else f", attention dropout {self.attention_dropout:g}"
        head = (
            f"memory: {self.source} {format_size(self.budget)} on {self.device}; "
            f"fixed {format_size(self.fixed)}, "
            f"{format_size(self.text_bytes)} per {self.max_length}-token text "
            f"({self.attention} attention{dropout})"
        )
        if self.chunk_plan is None:
            return f"{head} -> the whole batch of {self.texts_per_batch} texts in one pass"
        if self.source == "--mini-batch-size":
            return f"{head} -> GradCache chunks of {self.texts_per_chunk} texts (--mini-batch-size)"
        how = (
            f"GradCache chunks of {self.texts_per_chunk} texts at {self.max_length} tokens, more when shorter"
        )
        if self.gradient_checkpointing:
            how += ", with gradient checkpointing (not even one text fits without it)"
        return f"{head} -> {how}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "fixed_bytes": self.fixed,
            "text_bytes": round(self.text_bytes),
            "texts_per_chunk": self.texts_per_chunk,
            "texts_per_batch": self.texts_per_batch,
            "gradient_checkpointing": self.gradient_checkpointing,
            "attention": self.attention,
            "attention_dropout": self.attention_dropout,
            "max_length": self.max_length,
            "device": self.device,
            "source": self.source,
        }


def _optimizer_bytes(model: nn.Module) -> int:
    """Gradients plus AdamW's two moments: three float32 copies of the trainable parameters."""
    return 3 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def plan_embedding(
    model: Any,
    *,
    texts_per_batch: int,
    budget: int | None,
    mini_batch_size: int | None = None,
    autocast: torch.dtype | None = None,
) -> EmbeddingPlan:
    """Plan how one batch of ``texts_per_batch`` texts (queries and passages) is embedded.

    ``budget`` is the peak resident memory of the process on CPU, or the device memory on a GPU (default:
    :data:`train.config.CPU_MEMORY_BUDGET`, or :data:`train.config.GPU_MEMORY_SHARE` of the free memory).
    ``mini_batch_size`` skips planning: fixed GradCache chunks of that many texts.
    """
    device = next(model.parameters()).device
    attention = use_sdpa(model)
    dropout = attention_dropout(model)
    max_length = int(getattr(model, "max_seq_length", 0) or 512)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        source = "--memory-budget" if budget else "free device memory"
        budget = budget or int(free * GPU_MEMORY_SHARE)
        fixed = torch.cuda.memory_allocated(device) + _optimizer_bytes(model) + RESERVE_BYTES // 4
    else:
        source = "--memory-budget" if budget else "default budget"
        budget = budget or parse_size(CPU_MEMORY_BUDGET)
        fixed = current_rss_bytes() + _optimizer_bytes(model) + RESERVE_BYTES
    a, b = cost_model(model, max_length, autocast)
    text_bytes = a * max_length + b * max_length**2
    floor = fixed + BACKWARD_FACTOR * MIN_DEFAULT_CHUNK * text_bytes
    if source == "default budget" and budget < floor:  # e.g. inside `mpr run`, after other stages
        budget, source = (
            int(floor),
            "default budget raised (the process already holds "
            f"{format_size(fixed - _optimizer_bytes(model) - RESERVE_BYTES)}) to",
        )
    plan = EmbeddingPlan(
        None,
        False,
        attention,
        dropout,
        budget,
        fixed,
        text_bytes,
        texts_per_batch,
        texts_per_batch,
        max_length,
        device.type,
        source,
    )
    if mini_batch_size is not None:
        plan.chunk_plan = ChunkPlan(max_texts=mini_batch_size)
        plan.texts_per_chunk = mini_batch_size
        plan.source = "--mini-batch-size"
        return plan
    available = (budget - fixed) / BACKWARD_FACTOR
    fits = math.floor(available / text_bytes) if available > 0 else 0
    if fits >= texts_per_batch:
        return plan
    if fits >= 1:
        plan.chunk_plan = ChunkPlan(max_bytes=available, bytes_per_token=a, bytes_per_token_squared=b)
        plan.texts_per_chunk = fits
        return plan
    auto = transformer_of(model)
    if auto is not None and getattr(auto, "supports_gradient_checkpointing", False):
        layers = max(1, int(getattr(auto.config, "num_hidden_layers", 1)))
        if hasattr(auto, "activation_checkpointing_enable"):  # transformers >= 5
            auto.activation_checkpointing_enable({"use_reentrant": False})
        else:
            auto.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ca, cb = cost_model(model, max_length, autocast)
        # Checkpointing keeps each layer's input; the backward pass recomputes one layer at a time.
        ca, cb = ca + a / layers, cb + b / layers
        checkpointed = ca * max_length + cb * max_length**2
        fits = math.floor(available / checkpointed) if available > 0 else 0
        if fits >= 1:
            plan.chunk_plan = ChunkPlan(max_bytes=available, bytes_per_token=ca, bytes_per_token_squared=cb)
            plan.gradient_checkpointing = True
            plan.texts_per_chunk = min(fits, texts_per_batch)
            plan.text_bytes = checkpointed
            return plan
        disable = (
            getattr(auto, "activation_checkpointing_disable", None) or auto.gradient_checkpointing_disable
        )
        disable()
    need = fixed + BACKWARD_FACTOR * text_bytes
    raise MprError(
        f"--memory-budget {format_size(budget)} is too small to hold even one {max_length}-token text: "
        "the model, "
        f"its gradients and optimizer take {format_size(fixed)} and a text {format_size(text_bytes)}; "
        f"give at least {format_size(need)}, or a smaller --max-seq-length"
    )
