"""The weight gradients backward forms beyond the priced model states: the head's and the token embeddings'
``V x h`` gradients of a trained student (``activations.head_weight_grad``, ``activations.tied_head_grad``,
``activations.embedding_grad``), as measured by bench/lora.py. Split out of planner/memory.py, which adds them to
each micro-batch's step peak (``student_items``)."""

from __future__ import annotations

from gkdlang.spec import ModelSpec
from planner.plan import MemoryItem


def head_width(model: ModelSpec) -> int:
    """Columns of the model's head: its vocabulary for an LM head, its labels for a classifier."""
    return model.arch.vocab_size if model.head.kind == "lm" else (model.head.num_labels or 2)


def grads_held(zero_stage: int, grad_accum: int) -> bool:
    """Whether a weight's gradient is a temporary beyond the priced model states when backward forms it.

    ZeRO-0/1 keep ``.grad`` between the micro-batches of an accumulation (ZeRO-1 reduces only at the boundary;
    DeepSpeed's bf16 optimizer without ``immediate_grad_update`` accumulates in the 16-bit ``.grad`` too): from
    the second micro-batch on, autograd forms each gradient as a new tensor and adds it into ``.grad``. With
    ``grad_accum`` 1 the engine sets ``.grad`` to None after every step, and the first gradient formed *becomes*
    ``.grad`` (priced as ``student.grads``). ZeRO-2/3 copy every gradient into a reduce bucket and drop it, so
    the full-size gradient is never among the (sharded) states: a temporary on every micro-batch.
    """
    return zero_stage >= 2 or grad_accum > 1


def backward_grad_items(model: ModelSpec, acts: list[MemoryItem], logits: list[MemoryItem], micro: int, seq: int,
                        d: int, *, head_run: bool, fused: bool, grads_held: bool) -> list[MemoryItem]:
    """The ``V x h`` weight gradients of the head and the token embeddings, beyond the forward + loss peak.

    Measured (bench/lora.py ``--explain``: the torch profiler's allocator events, live tensors at the peak, by the
    op and autograd node that allocated them; Llama 4 x 576, V = 49,152, fp32, micro-batch 2 x 128, chunked
    ``ce``; V x h = 108.0 MiB):

    - tied head, ``.grad`` existing: peak 324.3 MiB at the end of backward = exactly three V x h tensors and no
      activation: the head's weight gradient (``MmBackward0``, held by autograd until the weight's other use has
      contributed), the embedding's dense gradient (``EmbeddingBackward0``) and their out-of-place sum (the
      ``aten::add`` that accumulates the two before ``.grad += sum``);
    - tied head, no ``.grad`` yet: the same three at the end, the sum becoming ``.grad``: two beyond the states;
    - untied head, ``.grad`` existing: peak 201.9 MiB at the head's backward = its V x h weight gradient (108.0,
      added into ``.grad`` and freed right after) + the chunked kernel's logit gradient (48.0) + the
      activations; the logits themselves are already freed (the chunked kernel keeps only its gradient);
    - untied head, no ``.grad`` yet: both V x h gradients become ``.grad``; nothing beyond the states.

    So, when the head's weight is trained and not fused (a fused head's weight gradient is ``loss.head_grads``,
    alive from the loss's forward on): ``activations.head_weight_grad`` = (activations + logit gradient + V x h)
    beyond the forward + loss peak, when ``grads_held``. At the end of backward, when every activation is freed:
    a tied weight run by the head holds 3 V x h (2 without ``grads_held``: the sum is ``.grad``),
    ``activations.tied_head_grad``; an untied embedding 1 V x h (0), ``activations.embedding_grad``; each
    beyond the larger of the two earlier phases. Frozen embeddings and head (a LoRA student) form neither.
    ZeRO-2/3 were not measured here (DeepSpeed on one CPU rank runs ZeRO-0): assumed the same tensors as
    ``grads_held`` (autograd forms the gradients the same way; the hook that copies them into the reduce bucket
    runs after the sum), and ZeRO-3's ``student.gathered_layer`` gradient is not subtracted (conservative).
    A dense kernel reading the logits is assumed to leave an fp32 logit gradient at the head's backward.
    """
    vh = model.arch.vocab_size * model.arch.hidden_size * d
    if model.adapter is not None or vh == 0:  # LoRA: embeddings and head frozen, no weight gradient of either
        return []
    forward = sum(i.bytes for i in [*acts, *logits])
    lm_head = head_run and model.head.kind == "lm"
    items, backward = [], forward
    if lm_head and not fused and grads_held:
        dense = micro * seq * head_width(model) * 4 if any(i.name == "loss.saved" for i in logits) else 0
        logit_grad = sum(i.bytes for i in logits if i.name == "loss.grad") + dense
        at_head = sum(i.bytes for i in acts) + logit_grad + vh
        if at_head > forward:
            items.append(MemoryItem(name="activations.head_weight_grad", bytes=at_head - forward,
                                    note="head weight's V x h gradient formed while the activations and the logit "
                                         "gradient are alive, beyond the forward + loss peak"))
            backward = at_head
    tied = lm_head and model.arch.tie_word_embeddings
    end = ((3 if tied else 1) - (0 if grads_held else 1)) * vh
    if end > backward:
        name, note = ("activations.tied_head_grad", "end of backward: the tied weight's head and embedding "
                      "gradients and their sum") if tied else \
            ("activations.embedding_grad", "embedding gradient at the end of backward")
        items.append(MemoryItem(name=name, bytes=end - backward, note=f"{note} ({end // vh} x V x h), beyond the "
                                                                      "freed activations"))
    return items
