"""Offline teachers: write a teacher's planned signals once to sharded files, read them by example index.

Takes a checked ``Spec``, a stage, the planner's ``ModelCapture`` of a teacher that declares
``cache: topk(k, dtype, path)``; gives:

- ``write_cache(job, rank=0, world=1)``: runs only the teacher over the stage's data and writes its signals;
  resumable (finished shards are skipped) and parallel (rank r writes shards r, r + world, ...).
- ``Contract`` and ``check_contract``: what a cache was made from (hashes of the teacher weights, the tokenizer
  and the tokenised data, seq_len, signals, k, tail form, samples, sampling seed, dtype, temperature); a mismatch
  is refused naming each field.
- ``CachedTeacher``: stands in for the teacher while training; ``signals(batch)`` reads the batch's examples
  (``batch["example_ids"]``) and pads them to the batch width.
- ``offline_terms``: the stage's loss terms as they read cached signals: ``kl`` on the teacher's logits becomes
  ``cached_kl`` (``tail: sampled``, the default: ``sampled_kl``, an unbiased estimate of the dense KL and of its
  gradient) or ``cached_kl_bucket`` (``tail: bucket``: the bucket form of ``sparse_kl``, a lower bound), and
  terms with no mask get ``not pad`` (the cache holds real tokens only; the teacher's outputs on padding carry
  no information).

The teacher distribution is p = softmax(logits / T) in fp32 at the contract's temperature T, the dense ``kl``'s
teacher side; the loss takes the student's softmax at the same T and the same T^2 scaling. ``tail: sampled``
keeps per token the k most probable tokens exactly, the tail mass, the tail's exact sum of p log p, and
``samples`` ids drawn (stratified, with replacement) from the tail distribution p_i / tail_mass; then
KL(p || q) = sum_topk p log(p / q) + sum_tail p log p - tail_mass * E_{i ~ p_tail}[log q_i], the expectation
estimated by the samples' mean. Samples are drawn from a generator seeded by (cache seed, example index), so a
cache is the same however it is split into shards, ranks or resumed runs.

Layout of a cache directory (``<cache.path>/<stage>``): ``contract.json``; ``shard-NNNNN.safetensors`` holding
``SHARD_EXAMPLES`` consecutive examples (``offsets`` [m+1] token offsets, ``example_ids``, and per signal
``logits.values`` [T, k] in the storage dtype, ``logits.indices`` [T, k] int16 shifted by 2^15 (int32 above
65,536 tokens), ``logits.tail`` [T] fp32 = 1 - sum of the stored values, with ``tail: sampled``
``logits.tail_xlogx`` [T] fp32 and ``logits.samples`` [T, samples] ids like the indices, ``hidden.3`` [T, h],
``task_logits`` [m, C]); ``complete.json`` once every shard exists. Shards are written to a temporary name and
renamed, so a shard file that exists is whole. Training reads them through memory maps (only the rows of a
batch's examples are touched).
"""

from __future__ import annotations

import hashlib
import json
import mmap
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from gkdlang.spec import CacheSpec, LossTerm, ModelSpec, SignalNode, Spec, StageSpec
from planner.offline import (EXAMPLE_KINDS, SHORT_VOCAB, TOKEN_KINDS, cache_dir, cache_temperature, offline_problems,
                             packed_logits_width)
from planner.plan import ModelCapture
from runtime.errors import RunError
from runtime.files import atomic_path, atomic_write
from runtime.models import DTYPES
from runtime.losses import LOSSES, sampled_kl, sparse_kl

CACHE_FORMAT = 2
SHARD_EXAMPLES = 256
"""Examples per shard: the unit of resume and of the split across ranks."""
WRITE_BATCH = 8
"""Examples per teacher forward while writing."""
CONTRACT_FILE, COMPLETE_FILE = "contract.json", "complete.json"
STORE_DTYPES = DTYPES
_SHIFT = 1 << 15


# ================================================================ contract


@dataclass(frozen=True)
class Contract:
    """What a cache was made from; a run reads it only if every field matches what its spec needs."""

    format: int
    teacher: str
    stage: str
    teacher_weights: str
    """sha256 of the weight files and config (local folders) or of the built state dict."""
    tokenizer: str
    data: str
    """sha256 of the tokenised examples the teacher reads (its input ids, in order)."""
    examples: int
    seq_len: int
    signals: tuple[str, ...]
    k: int
    tail: str
    """``sampled`` or ``bucket`` (see the module docstring)."""
    samples: int
    """Tail samples per token (0 with ``bucket``)."""
    seed: int
    """Seed of the tail samples."""
    dtype: str
    temperature: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> "Contract":
        try:
            raw = json.loads(path.read_text())
            raw["signals"] = tuple(raw["signals"])
            raw["format"]  # a contract of an older format lacks fields: they read as None and are named as such
            return cls(**{f.name: raw.get(f.name) for f in fields(cls)})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunError(f"{path} is not a gkdc cache contract ({err}); delete {path.parent} and write it again")


def check_contract(stored: Contract, expected: Contract, where: Path) -> None:
    """Refuse a cache whose contract differs from ``expected``, naming every differing field."""
    diffs = [f"{f.name}: cache has {_short(getattr(stored, f.name))}, the spec needs {_short(getattr(expected, f.name))}"
             for f in fields(Contract) if getattr(stored, f.name) != getattr(expected, f.name)]
    if diffs:
        raise RunError(f"cache {where} does not match stage '{expected.stage}' of this spec ({'; '.join(diffs)}); "
                       f"write it again with `gkdc cache` (or delete {where})")


def _short(value: Any) -> str:
    text = ", ".join(value) if isinstance(value, tuple) else str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def signal_names(capture: ModelCapture) -> tuple[str, ...]:
    return tuple(sorted(_key_name(p.kind, p.layer) for p in capture.points))


def _key_name(kind: str, layer: int | None) -> str:
    return kind if layer is None else f"{kind}.{layer}"


def weights_fingerprint(model: ModelSpec, base_dir: Path, build: Callable[[], torch.nn.Module]) -> str:
    """Hash of what the teacher computes with: its config, dtype and init, plus the weight files of a local
    pretrained folder, or else the state dict of the built model (random init, hub models)."""
    h = hashlib.sha256(json.dumps([model.arch.config, model.dtype, model.init.model_dump()], sort_keys=True,
                                  default=str).encode())
    folder = Path(model.source or "")
    folder = folder if folder.is_absolute() else base_dir / folder
    files = sorted(folder.glob("*.safetensors")) if model.source_kind == "local" and model.init.kind == "pretrained" \
        else []
    if files:
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        return h.hexdigest()
    for name, tensor in sorted(build().state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab, tokenizer.pad_token_id]).encode()).hexdigest()


def data_fingerprint(input_ids: list[list[int]], seq_len: int) -> str:
    h = hashlib.sha256(f"seq_len={seq_len};".encode())
    for ids in input_ids:
        h.update(torch.tensor(ids, dtype=torch.int32).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


# ================================================================ the job


@dataclass(frozen=True)
class CacheJob:
    """One teacher's cache for one stage: what to compute and where."""

    spec: Spec
    stage_index: int
    stage: StageSpec
    teacher: str
    capture: ModelCapture
    base_dir: Path
    """The spec's directory: relative data, model and cache paths are resolved against it."""
    out: Path | None = None
    """Cache directory; None = ``<cache.path>/<stage>`` from the spec."""

    @property
    def model(self) -> ModelSpec:
        return self.spec.models[self.teacher]

    @property
    def directory(self) -> Path:
        if self.out is not None:
            return self.out
        return cache_dir(self.spec.file, self.model, self.base_dir) / self.stage.name

    @property
    def seq_len(self) -> int:
        return self.stage.seq_len or self.spec.data[self.stage.data].seq_len


def jobs_for(spec: Spec, captures: Mapping[str, list[ModelCapture]], base_dir: Path, *, stage: str | None = None,
             out: Path | None = None) -> list[CacheJob]:
    """Every cacheable (stage, teacher) of ``spec`` (or of one ``stage``); ``captures``: stage -> captures."""
    names = [s.name for s in spec.stages]
    if stage is not None and stage not in names:
        raise RunError(f"--stage: no stage '{stage}' in {spec.file} (stages: {', '.join(names)})")
    jobs = []
    for index, st in enumerate(spec.stages):
        if stage is not None and st.name != stage:
            continue
        for cap in captures[st.name]:
            model = spec.models[cap.model]
            if cap.model in st.students or model.cache is None or not cap.points:
                continue
            problems = offline_problems(spec, st, cap.model, cap)
            if problems:
                raise RunError(f"stage '{st.name}': teacher '{cap.model}' cannot be cached: {'; '.join(problems)}")
            target = out / st.name if out is not None else None
            jobs.append(CacheJob(spec, index, st, cap.model, cap, base_dir, target))
    if not jobs:
        where = f"stage '{stage}'" if stage else spec.file
        raise RunError(f"{where}: no teacher declares `cache: topk(...)` and is read by a stage; nothing to cache")
    return jobs


def _student_spec(job: CacheJob) -> ModelSpec:
    return job.spec.models[job.stage.students[0]]


def tokenized(job: CacheJob, tokenizer: Any) -> Any:
    """The stage's tokenised data exactly as the run tokenises it (same tokenizer, seq_len, limits)."""
    from runtime import data as D

    spec, stage = job.spec, job.stage
    data_spec = spec.data[stage.data]
    student = _student_spec(job)
    max_positions = min(spec.models[m].arch.max_positions for m in [*stage.teachers, *stage.students])
    texts = D.load_texts(data_spec, job.base_dir)
    from planner.tokens import packing_choice  # the decision the plan recorded for this stage

    return D.tokenize(texts, data_spec, tokenizer, job.seq_len, causal=not student.arch.is_encoder,
                      num_labels=student.head.num_labels, max_positions=max_positions,
                      packed=packing_choice(spec, stage).packed)


def build_teacher(job: CacheJob, seed: int) -> torch.nn.Module:
    """The teacher as the online run builds it (same seed, so a random-init teacher gets the same weights)."""
    from runtime import models as M
    from runtime.stagekit import pruned, seed_everything

    seed_everything(seed)
    net = M.build_model(job.model, job.base_dir, {})
    return pruned(net, job.capture).eval()


def expected_contract(job: CacheJob, tokenizer: Any, tokens: Any, weights: str) -> Contract:
    return Contract(format=CACHE_FORMAT, teacher=job.teacher, stage=job.stage.name, teacher_weights=weights,
                    tokenizer=tokenizer_fingerprint(tokenizer),
                    data=data_fingerprint(tokens.dataset["input_ids"], job.seq_len), examples=len(tokens),
                    seq_len=job.seq_len, signals=signal_names(job.capture), k=job.model.cache.k,
                    tail=job.model.cache.tail, samples=job.model.cache.samples, seed=job.model.cache.seed,
                    dtype=job.model.cache.dtype, temperature=cache_temperature(job.stage, job.teacher))


# ================================================================ writing


@dataclass(frozen=True)
class WriteResult:
    directory: Path
    shards_written: int
    shards_skipped: int
    complete: bool
    bytes: int
    tokens: int


def write_cache(job: CacheJob, *, rank: int = 0, world: int = 1, seed: int | None = None,
                limit_shards: int | None = None) -> WriteResult:
    """Run the teacher over the stage's data and write this rank's missing shards (see the module docstring).

    ``limit_shards`` stops after writing that many shards (tests of resume; a killed run looks the same).
    """
    from runtime import models as M
    from runtime.stagekit import SEED

    seed = SEED + 1000 * job.stage_index if seed is None else seed
    tokenizer = M.load_tokenizer(_student_spec(job), job.spec.models, job.base_dir)
    tokens = tokenized(job, tokenizer)
    teacher = build_teacher(job, seed)
    contract = expected_contract(job, tokenizer, tokens, weights_fingerprint(job.model, job.base_dir, lambda: teacher))
    directory = job.directory
    _claim(directory, contract)
    n_shards = -(-len(tokens) // SHARD_EXAMPLES)
    written = skipped = 0
    for shard in range(rank, n_shards, world):
        path = shard_path(directory, shard)
        if path.exists():
            skipped += 1
            continue
        if limit_shards is not None and written >= limit_shards:
            break
        _write_shard(job, teacher, tokens, shard, path, contract)
        written += 1
    complete = _mark_complete(directory, n_shards, contract)
    total = sum(p.stat().st_size for p in directory.glob("shard-*.safetensors"))
    n_tokens = sum(len(ids) for ids in tokens.dataset["input_ids"])
    return WriteResult(directory, written, skipped, complete, total, n_tokens)


def shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:05d}.safetensors"


def _claim(directory: Path, contract: Contract) -> None:
    """Write the contract, or refuse a directory already holding a cache of something else (no mixed shards)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONTRACT_FILE
    if path.exists():
        check_contract(Contract.from_file(path), contract, directory)
        return
    atomic_write(path, contract.to_json())


def _write_shard(job: CacheJob, teacher: torch.nn.Module, tokens: Any, shard: int, path: Path,
                 contract: Contract) -> None:
    from safetensors.torch import save_file

    from runtime.adapters import capture

    start, end = shard * SHARD_EXAMPLES, min((shard + 1) * SHARD_EXAMPLES, len(tokens))
    parts: dict[str, list[Tensor]] = {}
    lengths: list[int] = []
    for lo in range(start, end, WRITE_BATCH):
        ids = list(range(lo, min(lo + WRITE_BATCH, end)))
        batch = tokens.collate(ids, 0)  # causal data: no masking, so the seed plays no part
        captured = capture(teacher, batch, job.capture, grad=False)
        for j, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            lengths.append(int(length))
            for (kind, layer), value in captured.items():
                for name, tensor in _encode(kind, layer, value[j], int(length), job.model, contract,
                                            ids[j]).items():
                    parts.setdefault(name, []).append(tensor)
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    tensors = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
    tensors["offsets"] = offsets
    tensors["example_ids"] = torch.arange(start, end, dtype=torch.int64)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"contract": contract.data[:16], "shard": str(shard)})


def _encode(kind: str, layer: int | None, value: Tensor, length: int, model: ModelSpec, contract: Contract,
            example: int) -> dict[str, Tensor]:
    """One example's signal as stored: real tokens only; logits as top-k probabilities, ids and the tail."""
    dtype = STORE_DTYPES[contract.dtype]
    name = _key_name(kind, layer)
    if kind in EXAMPLE_KINDS:
        return {name: value.detach().float().to(dtype)[None]}
    value = value[:length]
    if kind != "logits":
        return {name: value.detach().float().to(dtype)}
    return encode_logits(value, contract, example, model.arch.vocab_size)


def encode_logits(logits: Tensor, contract: Contract, example: int, vocab: int) -> dict[str, Tensor]:
    """``[n, V]`` teacher logits of one example -> the stored ``logits.*`` tensors (see the module docstring)."""
    k = contract.k
    # the dense kl's teacher side: softmax(t / T) in fp32
    probs = torch.softmax(logits.detach().float() / contract.temperature, dim=-1)
    top, ids = probs.topk(k, dim=-1)
    stored = top.to(STORE_DTYPES[contract.dtype])
    full = k == probs.shape[-1]
    # the tail is what the *stored* values leave, so the stored distribution sums to one exactly
    tail = torch.zeros(probs.shape[0]) if full else (1 - stored.float().sum(-1)).clamp_min(0)
    out = {"logits.values": stored, "logits.indices": _pack_ids(ids, vocab), "logits.tail": tail}
    if contract.tail == "bucket":
        return out
    rest = probs.scatter(-1, ids, 0.0)  # the tail's probabilities, zero on the top k
    out["logits.tail_xlogx"] = torch.special.xlogy(rest.double(), rest.double()).sum(-1).float()
    out["logits.samples"] = _pack_ids(sample_tail(rest, contract.samples, _example_generator(contract.seed, example),
                                                  fallback=ids[:, 0]), vocab)
    return out


def _example_generator(seed: int, example: int) -> torch.Generator:
    digest = hashlib.sha256(f"gkdc-cache-samples:{seed}:{example}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_tail(rest: Tensor, m: int, generator: torch.Generator, fallback: Tensor) -> Tensor:
    """``[n, m]`` ids drawn from each row of ``rest`` (unnormalised tail probabilities), stratified: the j-th
    draw falls in the j-th m-quantile of the row's cumulative mass, so each id appears m p_i / mass times in
    expectation and the draws' mean is unbiased with at most the variance of independent draws. A row with no
    mass gets ``fallback`` (its weight, the tail mass, is zero up to rounding)."""
    n, vocab = rest.shape
    cdf = rest.double().cumsum(-1)
    mass = cdf[:, -1:]
    u = (torch.arange(m, dtype=torch.float64) + torch.rand(n, m, generator=generator, dtype=torch.float64)) / m
    picks = torch.searchsorted(cdf, u * mass, right=True).clamp_max(vocab - 1)
    # u * mass rounded up to the row's total lands past its last live token: take the row's largest instead
    dead = rest.gather(-1, picks) <= 0
    picks = torch.where(dead, rest.argmax(-1, keepdim=True).expand(n, m), picks)
    return torch.where(mass > 0, picks, fallback[:, None].expand(n, m))


def _pack_ids(ids: Tensor, vocab: int) -> Tensor:
    return (ids - _SHIFT).to(torch.int16) if vocab <= SHORT_VOCAB else ids.to(torch.int32)


def _unpack_ids(ids: Tensor) -> Tensor:
    return ids.long() + _SHIFT if ids.dtype == torch.int16 else ids.long()


def _mark_complete(directory: Path, n_shards: int, contract: Contract) -> bool:
    if not all(shard_path(directory, i).exists() for i in range(n_shards)):
        return False
    record = {"shards": n_shards, "examples": contract.examples, "data": contract.data,
              "shard_examples": SHARD_EXAMPLES}
    atomic_write(directory / COMPLETE_FILE, json.dumps(record) + "\n")
    return True


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_FILE).is_file()


# ================================================================ reading


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I16": torch.int16,
                       "I32": torch.int32, "I64": torch.int64}


def mapped_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file as a view of one private read-only memory map (no copy: a batch
    touches only its rows' pages)."""
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: torch wants a writable buffer
    size = int.from_bytes(mm[:8], "little")
    header = json.loads(mm[8:8 + size])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        lo, hi = info["data_offsets"]
        count = (hi - lo) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + size + lo) if count else \
            torch.empty(0, dtype=dtype)
        out[name] = flat.view(info["shape"])
    return out


class CacheReader:
    """Signals of examples by index, memory-mapped from the shards (only the rows asked for are read)."""

    def __init__(self, directory: Path, contract: Contract) -> None:
        if not is_complete(directory):
            raise RunError(f"cache {directory} is incomplete; finish it with `gkdc cache` (it resumes)")
        self.directory = directory
        self.contract = contract
        record = json.loads((directory / COMPLETE_FILE).read_text())
        self.shard_examples = int(record.get("shard_examples", SHARD_EXAMPLES))
        self._open: dict[int, dict[str, Tensor]] = {}
        self._offsets: dict[int, list[int]] = {}

    def _shard(self, shard: int) -> tuple[dict[str, Tensor], list[int]]:
        if shard not in self._open:
            path = shard_path(self.directory, shard)
            if not path.exists():
                raise RunError(f"cache {self.directory}: shard {path.name} is missing; write the cache again")
            tensors = mapped_tensors(path)
            self._open[shard] = tensors
            self._offsets[shard] = tensors["offsets"].tolist()
        return self._open[shard], self._offsets[shard]

    def example(self, index: int) -> dict[str, Tensor]:
        """The stored tensors of example ``index`` (token-major, real tokens only; views of the shard)."""
        if not 0 <= index < self.contract.examples:
            raise RunError(f"cache {self.directory}: example {index} is outside 0..{self.contract.examples - 1}")
        shard, row = divmod(index, self.shard_examples)
        tensors, offsets = self._shard(shard)
        lo, hi = offsets[row], offsets[row + 1]
        out = {}
        for name, tensor in tensors.items():
            if name in ("offsets", "example_ids"):
                continue
            out[name] = tensor[row:row + 1] if name.split(".")[0] in EXAMPLE_KINDS else tensor[lo:hi]
        return out

    def batch(self, ids: list[int], width: int) -> dict[tuple[str, int | None], Tensor]:
        """Signals of a padded batch ``[b, width, ...]`` in fp32; logits packed as ``cached_kl`` reads them
        (see ``pack_logits``)."""
        examples = [self.example(i) for i in ids]
        token_names = [n for n in (examples[0] if examples else {}) if n.split(".")[0] not in EXAMPLE_KINDS]
        lengths = [e[token_names[0]].shape[0] if token_names else 0 for e in examples]
        for n in lengths:
            if n > width:
                raise RunError(f"cached example has {n} tokens but the batch is {width} wide; the cache was "
                               f"written for other data")
        # where each stored token row goes in the flattened [b * width] batch
        rows = torch.cat([torch.arange(n) + j * width for j, n in enumerate(lengths)]) if ids else \
            torch.zeros(0, dtype=torch.long)
        out: dict[tuple[str, int | None], Tensor] = {}
        for name in self.contract.signals:
            kind, layer = (name.split(".") + [None])[:2]
            key = (kind, int(layer) if layer is not None else None)
            if kind in EXAMPLE_KINDS:
                out[key] = torch.cat([e[name] for e in examples]).float()
                continue
            if kind == "logits":
                parts = {n: torch.cat([e[n] for e in examples]) for n in token_names if n.startswith("logits.")}
                flat, pad = pack_logits(parts, self.contract)
            else:
                flat = torch.cat([e[name] for e in examples]).float()
                pad = torch.zeros(flat.shape[1:])
            full = pad.expand(len(ids) * width, *pad.shape).clone()
            full[rows] = flat
            out[key] = full.view(len(ids), width, *pad.shape)
        return out


def packed_width(contract: Contract) -> int:
    """Last dim of the packed logits rows: 2 (k + samples) + 1 (``sampled``), 2k + 1 (``bucket``)."""
    return packed_logits_width(contract.k, contract.tail, contract.samples)


def pack_logits(parts: Mapping[str, Tensor], contract: Contract) -> tuple[Tensor, Tensor]:
    """Stored ``logits.*`` rows -> (packed fp32 rows, the row padding positions get).

    ``tail: sampled``: [weights (k + m) | ids (k + m) | sum_i p_i log p_i]: the top-k probabilities, then the m
    tail samples weighing tail_mass / m each (the sparse target ``sampled_kl`` reads). ``tail: bucket``:
    [values (k) | ids (k) | tail mass]. Padding: zero weights (no loss, no gradient); with ``bucket``, k distinct
    ids (so the student's head mass stays below one) and all mass in the tail."""
    k = contract.k
    values = parts["logits.values"].float()
    ids = _unpack_ids(parts["logits.indices"]).float()
    tail = parts["logits.tail"].float()
    if contract.tail == "bucket":
        pad = torch.cat([torch.zeros(k), torch.arange(k, dtype=torch.float32), torch.ones(1)])
        return torch.cat([values, ids, tail[:, None]], dim=-1), pad
    m = contract.samples
    samples = _unpack_ids(parts["logits.samples"]).float()
    weights = torch.cat([values, (tail / m)[:, None].expand(-1, m)], dim=-1)
    neg_entropy = torch.special.xlogy(values, values).sum(-1) + parts["logits.tail_xlogx"].float()
    pad = torch.zeros(packed_width(contract))
    return torch.cat([weights, ids, samples, neg_entropy[:, None]], dim=-1), pad


class CachedTeacher:
    """Stands in for an offline teacher: ``signals(batch)`` reads the batch's examples from the cache."""

    def __init__(self, name: str, reader: CacheReader) -> None:
        self.name = name
        self.reader = reader

    def signals(self, batch: Mapping[str, Tensor]) -> dict[tuple[str, int | None], Tensor]:
        if "example_ids" not in batch:
            raise RunError(f"teacher '{self.name}' reads its cache by example index, but the batch has no example_ids")
        device = batch["input_ids"].device
        ids = [int(i) for i in batch["example_ids"].tolist()]
        return {key: t.to(device) for key, t in self.reader.batch(ids, batch["input_ids"].shape[1]).items()}


def open_teacher(job: CacheJob, tokenizer: Any, tokens: Any, *, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] = lambda: None) -> CachedTeacher:
    """The cache of ``job`` checked against this run's teacher, tokenizer and data; written first (all ranks
    sharing the shards) when it is missing or incomplete."""
    directory = job.directory
    if not is_complete(directory):
        write_cache(job, rank=rank, world=world)
        barrier()
        if rank == 0:
            write_cache(job, rank=0, world=1)  # only marks it complete when other ranks wrote their part
        barrier()
    from runtime.stagekit import SEED

    seed = SEED + 1000 * job.stage_index
    weights = weights_fingerprint(job.model, job.base_dir, lambda: build_teacher(job, seed))
    expected = expected_contract(job, tokenizer, tokens, weights)
    stored = Contract.from_file(directory / CONTRACT_FILE)
    check_contract(stored, expected, directory)
    return CachedTeacher(job.teacher, CacheReader(directory, stored))


# ================================================================ loss terms


def offline_terms(terms: list[LossTerm], caches: Mapping[str, CacheSpec]) -> list[LossTerm]:
    """The stage's terms as they read the caches of the teachers in ``caches`` (name -> its ``cache`` spec;
    see the module docstring)."""
    teachers = set(caches)
    out = []
    for term in terms:
        reads = _reads_any(term.target, teachers) or _reads_any(term.pred, teachers)
        if not reads:
            out.append(term)
            continue
        update: dict[str, Any] = {"mask": term.mask or "not pad"}
        t = term.target
        if isinstance(t, SignalNode) and t.model in teachers and t.kind == "logits":
            if term.fn != "kl":
                raise RunError(f"loss term '{term.id}': {term.fn} cannot read cached logits (kl only)")
            update["fn"] = "cached_kl" if caches[t.model].tail == "sampled" else "cached_kl_bucket"
            update["options"] = {k: v for k, v in term.options.items() if k in ("T", "scale_t2")}
        out.append(term.model_copy(update=update))
    return out


def _reads_any(node, teachers) -> bool:
    if isinstance(node, SignalNode):
        return node.model in teachers
    return any(_reads_any(child, teachers) for child in node.inputs)


def cached_kl(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, T: float = 1.0,
              scale_t2: bool = True) -> Tensor:
    """``sampled_kl`` from a packed cached target ``[..., 2J + 1]`` = weights | ids | sum p log p (J = k + m:
    the top-k probabilities, then m tail samples weighing tail_mass / m each)."""
    j = (target.shape[-1] - 1) // 2
    if target.shape[-1] != 2 * j + 1:
        raise RunError(f"cached_kl: target last dim {target.shape[-1]} is not 2(k + samples) + 1")
    return sampled_kl(target[..., :j], target[..., j:2 * j].long(), target[..., 2 * j], pred, T, mask=mask,
                      scale_t2=scale_t2)


def cached_kl_bucket(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, T: float = 1.0,
                     scale_t2: bool = True) -> Tensor:
    """``sparse_kl`` (bucket form) from a packed cached target ``[..., 2k + 1]`` = top-k probabilities | ids |
    tail mass."""
    k = (target.shape[-1] - 1) // 2
    if target.shape[-1] != 2 * k + 1:
        raise RunError(f"cached_kl_bucket: target last dim {target.shape[-1]} is not 2k + 1")
    values, ids, tail = target[..., :k], target[..., k:2 * k].long(), target[..., 2 * k]
    return sparse_kl(values, ids, tail, pred, T, mask=mask, scale_t2=scale_t2)


# registered here: only runs that read a cache produce such terms
LOSSES.setdefault("cached_kl", cached_kl)
LOSSES.setdefault("cached_kl_bucket", cached_kl_bucket)


# ================================================================ the run's side


def offline_teachers(strategy: Mapping[str, str]) -> set[str]:
    return {name for name, s in strategy.items() if s == "offline"}
