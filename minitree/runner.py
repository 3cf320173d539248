"""A runner: how one model runs on this machine. The model (model.py) is only the model.

A runner owns, for one model: the static KV cache; its own tree of modules over the model's
weights (shared, never written), in which every linear layer is served through forms.FormLinear;
the compiled decoder layers (regional compilation: one graph per query length, reused by every
layer of a kind, `fullgraph=True, dynamic=False`; called through Dynamo once per signature,
CompiledLayer); the plan (costs.py: how many rows a forward runs, in which kernel setting, with
which copies of the weights, in which prefill chunks); and which shapes have been compiled. Two
runners on one model share its weights and nothing else.

A forward through a runner takes the tree mask's tensors (attention.py) and returns fp32 logits
over the whole vocabulary: padded rows are dropped, a tensor-parallel model's vocabulary rows
are gathered from every rank, a restricted draft vocabulary is padded with -inf.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list as dynamo_entries  # Dynamo's debugging API
from torch._C._dynamo.guards import GlobalStateGuard

from .attention import BLOCK, KINDS, TreeMask
from .costs import PREFILL_CHUNKS, Plan, form_layers
from .errors import EngineError
from .forms import LOSSY, FormLinear, replace_linears
from .kernels import available as kernels_available
from .machine import pin_vector_width
from .model import RMSNorm, Transformer
from .tree import MAX_NODES

PLANS = ("measure", "exact", "none")


class RowNorm(nn.Module):
    """An RMSNorm (model.py) on minitree's kernel (csrc/norm.cpp): each row summed alone, in one order.
    Inductor's code for a one-row forward splits that row's sum over the threads, so a token would
    round differently alone than beside others; runners with exact attention use this instead."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.minitree_kernels.rms_norm(x, self.weight, self.eps)


class CompiledLayer:
    """Calls a compiled decoder layer the way Dynamo would, without Dynamo's per-call work.

    `nn.Module.compile` sends every call through Dynamo's frame hook, which checks guards to find the
    compiled entry of DecoderLayer.forward (one code object, shared by every layer of every runner)
    that fits the call, then runs it: on 2 Zen 4 cores about 2 ms of a one-row forward of the 1.5B
    target (28 layer calls) beyond the entries themselves, even when Dynamo checks only the guards
    that tell its entries apart (`skip_guard_eval_unsafe`). A full guard check costs more (about 0.1 ms
    a call: some 300 guards, whose data the kernels' weight streams have evicted from the caches).

    Here a call's signature picks the entry: every tensor argument's shape, strides, dtype, device
    and autograd flags, and the other arguments themselves, which is all that Dynamo's guards read
    of what changes from one call of a runner's layer to the next (its modules, weights and forms are
    fixed when the runner is made), plus the global state Dynamo guards (grad mode, threads, ...). The
    first call of a signature goes through Dynamo, which compiles it if it must (or raises under
    `error_on_recompile`); the entry whose guards, all of them, pass on that call is kept for the
    signature, and later calls run its code, the code Dynamo itself runs, as a plain function. A
    layer with hooks is always called through Dynamo (the code does not run them)."""

    def __init__(self, layer: nn.Module):
        layer.compile(fullgraph=True, dynamic=False)
        self.layer, self.dynamo = layer, layer._compiled_call_impl
        forward = type(layer).forward
        self.code, self.globals = forward.__code__, forward.__globals__
        self.names = self.code.co_varnames[: self.code.co_argcount]  # ("self", "x", "cos", ...)
        self.entries: dict[tuple, tuple] = {}  # signature -> (global state, entry's code as a function)
        layer._compiled_call_impl = self  # what nn.Module.__call__ calls on a compiled module

    def __call__(self, *args, **kwargs):
        if kwargs or _hooked(self.layer):
            return self.dynamo(*args, **kwargs)
        key = _signature(args)
        entry = self.entries.get(key)
        if entry is not None and entry[0].check():
            return entry[1](self.layer, *args)
        out = self.dynamo(*args)
        frame = dict(zip(self.names, (self.layer, *args)))
        for e in dynamo_entries(self.code):
            if e.guard_manager.check(frame):
                self.entries[key] = (GlobalStateGuard(), types.FunctionType(e.code, self.globals))
                break
        return out


def _signature(args) -> tuple:
    """What Dynamo's guards read of a call's arguments, besides the modules (CompiledLayer)."""
    return tuple((a.shape, a.stride(), a.dtype, a.device, a.requires_grad, a.is_inference(), a._is_view())
                 if isinstance(a, torch.Tensor) else (type(a), _signature(a)) if isinstance(a, tuple) else a
                 for a in args)


def _hooked(module: nn.Module) -> bool:
    g = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or g._global_forward_hooks
                or g._global_forward_pre_hooks)


def configure_compiler(device: torch.device) -> None:
    """The process-wide Dynamo/Inductor settings compiled runners need; applied by the first Runner
    made with compile=True (importing minitree changes nothing)."""
    # The shared layer code gets one graph per (model shape, layer kind, query length); a bench run with several
    # trees and two models needs more than Dynamo's default of 8 before it would silently run eagerly.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    # Inductor's wrappers check every input's size and stride again at each call (Dynamo's guards have
    # checked them before): about 0.15 ms per decoder layer on 2 cores, a tenth of a 0.5B draft forward.
    torch._inductor.config.size_asserts = False
    if device.type == "cpu":
        pin_vector_width()
        # A compiled layer calls its ops from C++ rather than from Inductor's Python wrapper: one-row
        # forwards of the 1.5B target 1.4-2.3% faster on 2 Zen 4 cores (README, "Compilation"). A GPU
        # replays whole steps from CUDA graphs: no wrapper runs there.
        torch._inductor.config.cpp_wrapper = True


def replace_norms(model: nn.Module) -> nn.Module:
    """Every RMSNorm of `model` (a runner's own module tree) as a RowNorm, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RMSNorm):
                setattr(parent, name, RowNorm(child))
    return model


def own_modules(module: nn.Module) -> nn.Module:
    """A new tree of modules like `module`'s, sharing every parameter, buffer and attribute with it."""
    new = copy.copy(module)
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    new._modules = {name: own_modules(m) for name, m in module._modules.items() if m is not None}
    return new


class Runner:
    """Runs `model`: `runner(tokens, positions, slots, q_node, base, anc_bits)` -> logits [T, vocab].

    compile    compile the decoder layers (CPU: Inductor's C++ backend)
    attention  "exact" (minitree's CPU kernel: a token's attention rounds alike in every forward; the
               default on CPUs), "flex" (FlexAttention BlockMask; the default on GPUs, or without a
               C++ compiler) or "sdpa" (dense mask, the reference)
    plan       "measure" (rows, kernels, weight forms and prefill chunks from this machine's measured
               costs; the default when compiled), "exact" (every forward at least 4 rows, so bf16
               chains round like plain decoding), "none" (forwards as they come; the default when
               not compiled), or a costs.Plan
    lossy      the model only proposes (a draft): lossy weight forms (int8, int4) may serve it
    cache_len  KV cache slots to start with (`reserve` grows it)
    """

    def __init__(self, model: Transformer, *, compile: bool = True, attention: str | None = None,
                 plan: str | Plan | None = None, lossy: bool = False, prefill_chunks: tuple[int, ...] = PREFILL_CHUNKS,
                 cache_len: int = 0, name: str = "model"):
        self.device = model.device
        if attention is None:
            attention = "exact" if self.device.type == "cpu" and kernels_available() else "flex"
        if attention not in KINDS or (attention == "exact" and (self.device.type != "cpu" or not kernels_available())):
            raise EngineError(f"attention must be one of {', '.join(KINDS)} ('exact' on CPUs), got {attention!r}")
        plan = plan or ("measure" if compile else "none")
        if not isinstance(plan, Plan) and plan not in PLANS:
            raise EngineError(f"plan must be one of {', '.join(PLANS)}, got {plan!r}")
        if not prefill_chunks or not all(0 < c <= BLOCK for c in prefill_chunks):
            raise EngineError(f"prefill chunks must be in 1..{BLOCK}, got {prefill_chunks}")
        self.args, self.name, self.lossy, self.attention = model.args, name, lossy, attention
        self.prefill_chunks = tuple(prefill_chunks)
        self.model = replace_linears(own_modules(model), FormLinear)
        if attention == "exact":  # a token rounds alike in every forward: its norms too
            replace_norms(self.model)
        if compile:
            configure_compiler(self.device)
            for layer in self.model.model.layers:
                CompiledLayer(layer)
        if not isinstance(plan, Plan):
            plan = Plan.measured(self.model, name, lossy) if plan == "measure" else \
                Plan.exact() if plan == "exact" else Plan()
        elif not lossy and set(plan.costs) & set(LOSSY):  # a plan made for a draft: its exact settings only
            plan = Plan({k: v for k, v in plan.costs.items() if k not in LOSSY}, plan.min_rows, plan.name)
        self.plan = plan
        plan.apply(self.model)
        self.kv_cache = torch.zeros(0)
        self.reserve(cache_len)
        self.compiled: set[int] = set()  # row counts run at least once

    def reserve(self, cache_len: int) -> None:
        """Make the KV cache [layers, 2, 1, H_kv, S, D] hold at least `cache_len` slots (a multiple
        of the attention block); what it held is kept."""
        cache_len = -(-cache_len // BLOCK) * BLOCK
        if cache_len <= self.cache_len:
            return
        a, m = self.args, self.model
        old, self.kv_cache = self.kv_cache, torch.zeros(a.n_layers, 2, 1, a.n_kv_heads // a.world, cache_len,
                                                        a.head_dim, dtype=m.dtype, device=m.device)
        if old.numel():
            self.kv_cache[..., : old.shape[4], :] = old

    @property
    def cache_len(self) -> int:
        return self.kv_cache.shape[4] if self.kv_cache.dim() == 6 else 0

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, q_node: torch.Tensor,
                 base: torch.Tensor, anc_bits: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        """One forward over tokens [T] at `slots`, under the tree mask (attention.py) -> fp32 logits
        [T, vocab] (None when logits=False). The ancestor bits are padded to MAX_NODES, so that
        compiled graphs depend on the row count only."""
        n = tokens.numel()
        rows = self.plan.rows(n)
        if rows > n:
            # Padded with copies of the first query (same token, slot and mask row, so the same cache
            # write) where the plan measured more rows to be cheaper, or to round alike (Plan.exact).
            pad = torch.cat([torch.arange(n, device=tokens.device),
                             torch.zeros(rows - n, dtype=torch.long, device=tokens.device)])
            tokens, positions, slots, q_node = tokens[pad], positions[pad], slots[pad], q_node[pad]
        mask = TreeMask(q_node, base, F.pad(anc_bits, (0, MAX_NODES - anc_bits.numel())), self.attention)
        if rows == 1:
            mask = mask.for_one_query(slots)
        with self.plan.kernels(rows):
            out = self.model(tokens, positions, slots, self.kv_cache, mask, logits)
        if not logits:
            return None
        out = out[:n].float()  # [n, this rank's vocabulary rows]
        if self.args.world > 1:  # every rank's vocabulary rows, side by side
            out = funcol.all_gather_tensor(out, 0, dist.group.WORLD).view(self.args.world, n, -1)
            out = out.transpose(0, 1).reshape(n, -1)
        if out.shape[-1] < self.args.vocab_size:  # a draft restricted to its first ids (forms.restrict_vocab)
            out = F.pad(out, (0, self.args.vocab_size - out.shape[-1]), value=float("-inf"))
        return out

    def cache(self, seq: torch.Tensor, start: int, end: int) -> None:
        """Cache the tokens seq[start:end] at their slots, in the chunk shapes the plan measured to be
        the cheapest for this length. Padding rows write token 0 to later slots, which are always
        written again before anything attends to them."""
        for c in self.plan.chunks(end - start, self.prefill_chunks):
            slots = torch.arange(start, start + c, device=self.device)
            causal = TreeMask.causal(c, self.device)
            self(seq[slots] * (slots < end), positions=slots, slots=slots, q_node=causal.q_node, base=causal.base,
                 anc_bits=causal.anc_bits, logits=False)
            start += c

    def compile_rows(self, rows: int, seq: torch.Tensor, first_slot: torch.Tensor) -> bool:
        """Run a forward of `rows` rows once on scratch slots from `first_slot`, unless one ran
        before, so that compiling lands here -> whether it ran."""
        if rows in self.compiled:
            return False
        self.compiled.add(rows)
        slots = first_slot + torch.arange(rows, device=self.device)
        self(seq[slots], positions=slots, slots=slots, q_node=torch.zeros_like(slots), base=slots[0],
             anc_bits=torch.ones(1, dtype=torch.long, device=self.device))
        return True

    def memory(self) -> dict[str, int]:
        """Bytes held: the model's weights (shared with it), the copies this runner made, the cache."""
        weights = sum(t.numel() * t.element_size() for t in
                      {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}.values())
        copies = sum(t.numel() * t.element_size() for m in form_layers(self.model)
                     for ts in m.copies().values() for t in ts)
        return dict(weights=weights, copies=copies, kv_cache=self.kv_cache.numel() * self.kv_cache.element_size())
